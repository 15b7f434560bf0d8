"""``cotune chat --adapter DIR [--prompt TEXT]``: talk to a causal LM with a trained adapter, output streamed.

Without ``--prompt`` it reads one user turn per line from stdin (a terminal or a pipe) and keeps the dialogue
(``/reset`` forgets it, ``/exit`` or end of input stops); with ``--prompt`` it answers once and exits. Turns go
through the tokenizer's chat template when it has one (SmolLM2-Instruct), else the prompt is the text itself.
Decoding is greedy unless ``--temperature`` is above 0. The base model comes from the run's ``config.yaml``
beside the adapter, else from ``base_model_name_or_path`` in ``adapter_config.json``, else ``--model``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cotune.errors import CotuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder of a causal LM (RUN/adapter or a PEFT LoRA folder)")
    p.add_argument("--model", help="base model (default: the run's config / the adapter's base_model_name_or_path)")
    p.add_argument("--prompt", help="answer this one message and exit (default: read messages from stdin)")
    p.add_argument("--system", help="system message (default: the run's task.options.system, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--device", help="cpu | cuda | auto (default: the run's device, else cpu)")


def load_chat_model(adapter: str, model_spec: str | None = None, device: str | None = None) -> tuple[Any, Any, dict]:
    """(model with the adapter, tokenizer, the run's task options) for a causal-LM adapter folder."""
    from cotune.adapters import load_adapter
    from cotune.models import load_model, load_tokenizer
    from cotune.training.saved import PEFT_TASKS, adapter_meta, run_config_path

    options: dict = {}
    meta = adapter_meta(adapter)
    spec, kind, dev = model_spec, PEFT_TASKS.get(str(meta.get("task_type"))), device
    cfg_path = run_config_path(adapter)
    if cfg_path is not None:
        from cotune.training.config import read_yaml

        run = read_yaml(cfg_path)
        spec = spec or run.get("model")
        kind = (run.get("task") or {}).get("kind", kind)
        options = dict((run.get("task") or {}).get("options") or {})
        dev = dev or run.get("device")
    spec = spec or meta.get("base_model_name_or_path")
    if not spec:
        raise CotuneError("the adapter does not name its base model; pass --model")
    if kind not in (None, "causal_lm"):
        raise CotuneError(f"cotune chat needs a causal-LM adapter; this one is {kind} (use cotune eval)")
    from cotune.training.trainer import check_model_available

    check_model_available(str(spec))
    if kind is None:  # nothing says what the adapter was trained for: ask the base model itself
        import transformers

        from cotune.models import resolve

        archs = transformers.AutoConfig.from_pretrained(resolve(str(spec))).architectures or []
        if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise CotuneError(
                f"cotune chat needs a causal-LM adapter; its base model {spec} is {', '.join(archs) or 'not a causal LM'}"
            )
    model = load_model(str(spec), "causal_lm")
    load_adapter(model, adapter)
    if dev == "auto":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev or "cpu").eval()
    tok = load_tokenizer(str(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, options


def reply(model: Any, tok: Any, messages: list[dict], max_new_tokens: int, temperature: float) -> str:
    """Generate the assistant's answer to ``messages``, streaming its text to stdout as it comes."""
    import torch
    from transformers import TextStreamer

    if getattr(tok, "chat_template", None) is not None:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages if m["role"] != "system") + "\n"
    bos = tok.bos_token
    enc = tok(text, add_special_tokens=not (bos and text.startswith(bos)), return_tensors="pt")
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    eos = {tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(eos) or None, streamer=streamer, **sample)
    return tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple | set) else [x]


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CotuneError("--max-new-tokens must be >= 1")
    model, tok, options = load_chat_model(args.adapter, args.model, args.device)
    system = args.system if args.system is not None else options.get("system")
    start = [{"role": "system", "content": system}] if system else []
    if args.prompt is not None:
        reply(model, tok, [*start, {"role": "user", "content": args.prompt}], args.max_new_tokens, args.temperature)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("cotune chat: type a message; /reset forgets the dialogue, /exit (or Ctrl-D) quits", file=sys.stderr)
    history = list(start)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": reply(model, tok, history, args.max_new_tokens,
                                                                 args.temperature)})
