"""``cotune chat``: talk to a causal LM with a trained adapter, output streamed.

Two places the model can be:

* ``--adapter DIR``: a local adapter folder, loaded here on its base model. The base model comes from the
  run's ``config.yaml`` beside the adapter, else from ``base_model_name_or_path`` in ``adapter_config.json``,
  else ``--model``.
* ``--server URL --model JOB``: a job (its finished adapter, or a running job's latest weights) or the base model
  on a ``cotune serve`` server, through its OpenAI-compatible ``/v1/chat/completions`` (streamed), with the
  tenant's token from ``--token`` or ``$COTUNE_TOKEN``.

Without ``--prompt`` it reads one user turn per line from stdin (a terminal or a pipe) and keeps the dialogue
(``/reset`` forgets it, ``/exit`` or end of input stops); with ``--prompt`` it answers once and exits. Turns go
through the tokenizer's chat template when it has one (SmolLM2-Instruct), else the prompt is the text itself.
Decoding is greedy unless ``--temperature`` is above 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cotune.errors import CotuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--adapter", help="adapter folder of a causal LM (RUN/adapter or a PEFT LoRA folder)")
    where.add_argument("--server", metavar="URL", help="a cotune server (e.g. http://127.0.0.1:8000): chat with --model")
    p.add_argument("--model", help="with --adapter: the base model (default: the run's config / the adapter's "
                   "base_model_name_or_path); with --server: a job id, or the server's base model name")
    p.add_argument("--token", default=None, help="with --server: the tenant's token (default $COTUNE_TOKEN)")
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

    from cotune.tasks.causal_lm import prompt_ids, stop_token_ids

    if getattr(tok, "chat_template", None) is not None:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages if m["role"] != "system") + "\n"
    ids = torch.tensor([prompt_ids(tok, text)], device=next(model.parameters()).device)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop_token_ids(model, tok)) or None,
                             streamer=streamer, **sample)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CotuneError("--max-new-tokens must be >= 1")
    if args.server:
        import os

        token = args.token or os.environ.get("COTUNE_TOKEN")
        if not token or not args.model:
            raise CotuneError("cotune chat --server needs --model JOB (a job id or the base model's name) and a token "
                              "(--token or COTUNE_TOKEN)")
        from cotune.service.client import Client

        client = Client(args.server, token)
        options: dict = {}  # the server adds the job's own system prompt

        def answer(messages: list[dict]) -> str:
            parts = []
            for delta in client.chat_stream(args.model, messages, args.max_new_tokens, args.temperature):
                print(delta, end="", flush=True)
                parts.append(delta)
            print(flush=True)
            return "".join(parts).strip()
    else:
        model, tok, options = load_chat_model(args.adapter, args.model, args.device)

        def answer(messages: list[dict]) -> str:
            return reply(model, tok, messages, args.max_new_tokens, args.temperature)
    system = args.system if args.system is not None else options.get("system")
    start = [{"role": "system", "content": system}] if system else []
    if args.prompt is not None:
        answer([*start, {"role": "user", "content": args.prompt}])
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
        history.append({"role": "assistant", "content": answer(history)})
