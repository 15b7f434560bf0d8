"""Many tenants decoding at once: cotune's batched multi-tenant decoding vs Hugging Face PEFT serving them in turn.

Base model SmolLM2-135M-Instruct (fp32, CPU). K tenants (``--ks``, default 1,4,8), each a LoRA r=8 (lowrank,
``q_proj`` + ``v_proj``) with random non-zero weights (so each answers unlike the base and unlike the others).
One request per tenant: K different real Alpaca instructions (``../shared/data/instruct/alpaca_en_demo.json``)
rendered with the tokenizer's chat template; N new tokens each (``--new-tokens``, default 32), greedy, no early
stop (cotune: no stop ids; PEFT: ``min_new_tokens = max_new_tokens = N`` and ``eos_token_id=None``, so neither
stops nor suppresses the end token: both do exactly the same N steps and may pick the same tokens).

Two runs per K, taken in turn (cotune first) inside one process, so they share the machine's drift:

* ``cotune``: the K requests decoded together in ONE ``cotune.tenants.decode`` call (one left-padded prefill,
  then one forward per token for all K rows, each row through its own tenant's adapters, one KV cache).
* ``peft-seq``: the anchor, PEFT serving without multi-adapter batching: ONE ``PeftModel`` holding the K adapters
  (each tenant saved with ``bank.save_tenant`` and loaded with ``PeftModel.from_pretrained`` / ``load_adapter``),
  the requests served one at a time: ``set_adapter(tenant)`` then ``generate``.

Measured per run (``time.perf_counter``; the prompts are tokenised before the clock starts): wall time for all
K requests; tokens/s = K*N / wall; time to first token (TTFT) of each request = the time of its first new token
minus the start of the run (cotune: the first ``on_token`` call of the row; PEFT: the second ``put`` of a
``BaseStreamer``, the first being the prompt), so request i of ``peft-seq`` includes waiting for the requests
served before it, as a queue would. Each measurement runs ``--repeats`` times (default 3) after one warm-up run
of both; the table gives medians (wall, and per request TTFT; "median TTFT" is the median over the K requests).
Ratios: cotune tokens/s ÷ peft-seq tokens/s, and cotune median TTFT ÷ peft-seq median TTFT (below 1: sooner).

Correctness, checked in every run: cotune's greedy tokens of each request must equal PEFT's for the same request
(``tokens_equal``; otherwise the two timings would compare different work); a mismatch is recorded with the
first differing position and printed.

Memory: the bytes of the base model's parameters, of one tenant's adapter (``tensor_bytes(bank.parameters(t))``),
and the process's RSS growth while tenants 2..K join the bank (after ``malloc_trim``), per extra tenant: an extra
tenant costs its adapter, never a second base. (The same figure for PEFT's ``load_adapter`` is in results.json.)

Physical limit (LIMIT, printed): on a CPU a decode step of a 135M-parameter model reads all its weights once,
whatever the number of rows (about 540 MB fp32 per step), so it is memory-bandwidth bound; batching K rows can
approach K times the tokens/s of one row until compute binds, while one-at-a-time serving pays the whole weight
read per token per request.

``python -m benchmarks generation [--ks 1,4,8] [--new-tokens 32] [--repeats 3] [--threads T] [--out DIR]``; results in
``runs/bench/generation/`` (``results.json``, ``throughput.png``: tokens/s against K for both runs).
``--smoke``: K in (1, 2), N=4, 1 repeat, no warm-up (a CI check of the whole pipeline).
Run the real measurement on a quiet machine (the load average before and after is recorded to judge it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DATA,
    line_plot,
    machine,
    machine_line,
    markdown_table,
    median,
    out_dir,
    rss_bytes,
    run_suite,
    set_offline,
    tensor_bytes,
    trim_heap,
    write_json,
)

MODEL = "smollm2"
R, TARGETS = 8, ["q_proj", "v_proj"]
#: scale of the random normal weights added to every adapter parameter (LoRA's B starts at zero)
SCALE = 0.1
KS, NEW_TOKENS, REPEATS = [1, 4, 8], 32, 3
ALPACA = DATA / "instruct" / "alpaca_en_demo.json"
LIMIT = (
    "a CPU decode step of a 135M model reads all weights once whatever the number of rows (about 540 MB fp32 per"
    " step, memory-bandwidth bound), so batching K rows can approach K x the tokens/s of one row until compute"
    " binds; one-at-a-time serving pays the full weight read per token per request"
)


def prompts(tok: Any, k: int) -> list[list[int]]:
    """The first ``k`` Alpaca instructions (with their input, if any) as chat-template token ids."""
    items = json.loads(ALPACA.read_text())
    out = []
    for it in items[:k]:
        q = it["instruction"] + (f"\n\n{it['input']}" if it.get("input") else "")
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    if len(out) < k:
        raise ValueError(f"{ALPACA} has {len(out)} items; K={k} needs {k}")
    return out


def build_bank(tenants: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """A SmolLM2 bank with ``tenants`` (random non-zero LoRA r=8), and the memory figures of building it.

    ``rss_after``: the process's RSS (after ``malloc_trim``) once the first i+1 tenants have joined.
    """
    import torch

    from cotune.adapters.registry import make_config
    from cotune.models import load_model
    from cotune.tenants import TenantBank

    model = load_model(MODEL, "causal_lm").eval()
    base_bytes = tensor_bytes(model.parameters())
    bank = TenantBank(model)
    g = torch.Generator().manual_seed(0)
    rss_after = []
    for t in tenants:
        bank.add_tenant(t, make_config("lowrank", r=R, target_modules=TARGETS))
        with torch.no_grad():
            for p in bank.parameters(t).values():
                p.add_(torch.randn(p.shape, generator=g) * SCALE)
        bank.set_trainable(False, [t])
        trim_heap()
        rss_after.append(rss_bytes())
    adapter_bytes = tensor_bytes(bank.parameters(tenants[0]).values())
    return bank, {"base_bytes": base_bytes, "adapter_bytes": adapter_bytes, "rss_after": rss_after}


def build_peft(bank: Any, tenants: Sequence[str], folder: Path) -> tuple[Any, list[int]]:
    """A fresh base wrapped in ONE ``PeftModel`` holding every tenant's adapter (saved by the bank, PEFT format)."""
    from peft import PeftModel

    from cotune.models import load_model

    base = load_model(MODEL, "causal_lm").eval()
    rss_after = []
    peft = None
    for t in tenants:
        path = str(bank.save_tenant(t, folder / t))
        if peft is None:
            peft = PeftModel.from_pretrained(base, path, adapter_name=t)
        else:
            peft.load_adapter(path, adapter_name=t)
        trim_heap()
        rss_after.append(rss_bytes())
    assert peft is not None
    return peft.eval(), rss_after


def run_cotune(bank: Any, tenants: Sequence[str], ids: Sequence[list[int]], n: int, pad_id: int) -> dict[str, Any]:
    """All requests in ONE ``decode`` call: wall time, each request's TTFT and tokens."""
    from cotune.tenants import DecodeRequest, decode

    first: list[float | None] = [None] * len(ids)

    def on_token(i: int):
        def cb(_tok: int) -> bool:
            if first[i] is None:
                first[i] = time.perf_counter()
            return False

        return cb

    reqs = [DecodeRequest(t, p, n, on_token=on_token(i)) for i, (t, p) in enumerate(zip(tenants, ids))]
    t0 = time.perf_counter()
    decode(bank, reqs, pad_id)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "ttft_s": [f - t0 if f is not None else float("nan") for f in first],
        "tokens": [r.tokens for r in reqs],
    }


def _first_token_timer() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        """``generate`` puts the prompt first, then each new token: the second ``put`` is the first new token."""

        def __init__(self) -> None:
            self.puts = 0
            self.first_at: float | None = None

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first_at = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstTokenTimer()


def run_peft(peft: Any, tenants: Sequence[str], ids: Sequence[Any], n: int, pad_id: int) -> dict[str, Any]:
    """The requests one at a time (``set_adapter`` + ``generate``): wall time, each request's TTFT and tokens."""
    import torch

    ttft, tokens = [], []
    t0 = time.perf_counter()
    for t, x in zip(tenants, ids):
        peft.set_adapter(t)
        timer = _first_token_timer()
        with torch.inference_mode():
            out = peft.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,  # neither stop at nor suppress the end token: cotune's decode has no stop ids
                do_sample=False,
                pad_token_id=pad_id,
                streamer=timer,
            )
        ttft.append(timer.first_at - t0 if timer.first_at is not None else float("nan"))
        tokens.append(out[0, x.shape[1] :].tolist())
    return {"wall_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens}


def _summary(runs: list[dict[str, Any]], k: int, n: int) -> dict[str, Any]:
    wall = median([r["wall_s"] for r in runs])
    ttft = [median([r["ttft_s"][i] for r in runs]) for i in range(k)]
    return {
        "wall_runs_s": [r["wall_s"] for r in runs],
        "ttft_runs_s": [r["ttft_s"] for r in runs],
        "median_wall_s": wall,
        "tokens_per_s": k * n / wall,
        "ttft_s": ttft,
        "median_ttft_s": median(ttft),
    }


def _mismatches(a: list[list[int]], b: list[list[int]]) -> list[dict[str, Any]]:
    """Requests whose tokens differ, with the first differing position."""
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            at = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            out.append({"request": i, "first_diff_at": at, "cotune": x, "peft": y})
    return out


def measure(ks: list[int], n: int, repeats: int, warmup: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every K's cotune and peft-seq runs (taken in turn), their medians, token check and memory figures."""
    import torch

    from cotune.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    tenants = [f"t{i}" for i in range(max(ks))]
    ids = prompts(tok, len(tenants))
    tensors = [torch.tensor([p]) for p in ids]
    bank, mem = build_bank(tenants)
    with tempfile.TemporaryDirectory() as tmp:
        peft, peft_rss = build_peft(bank, tenants, Path(tmp))
    rows = []
    for k in ks:
        ten = tenants[:k]
        if warmup:
            run_cotune(bank, ten, ids[:k], n, pad_id)
            run_peft(peft, ten, tensors[:k], n, pad_id)
        cot, hf = [], []
        for _ in range(repeats):
            cot.append(run_cotune(bank, ten, ids[:k], n, pad_id))
            hf.append(run_peft(peft, ten, tensors[:k], n, pad_id))
        mism = [m for c, h in zip(cot, hf) for m in _mismatches(c["tokens"], h["tokens"])]
        lengths_ok = all(len(t) == n for r in cot + hf for t in r["tokens"])
        c, h = _summary(cot, k, n), _summary(hf, k, n)
        growth = mem["rss_after"][k - 1] - mem["rss_after"][0]
        peft_growth = peft_rss[k - 1] - peft_rss[0]
        row = {
            "K": k,
            "tenants": ten,
            "prompt_tokens": [len(p) for p in ids[:k]],
            "new_tokens": n,
            "cotune": c,
            "peft_seq": h,
            "tokens_per_s_ratio": c["tokens_per_s"] / h["tokens_per_s"],
            "ttft_ratio": c["median_ttft_s"] / h["median_ttft_s"],
            "tokens_equal": not mism and lengths_ok,
            "mismatches": mism[:k],
            "tokens": cot[0]["tokens"],
            "text": [tok.decode(t) for t in cot[0]["tokens"]],
            "distinct_outputs": len({tuple(t) for t in cot[0]["tokens"]}),
            "memory": {
                "base_bytes": mem["base_bytes"],
                "adapter_bytes": mem["adapter_bytes"],
                "rss_growth_bytes": growth,
                "rss_per_extra_tenant_bytes": growth / (k - 1) if k > 1 else None,
                "peft_rss_per_extra_adapter_bytes": peft_growth / (k - 1) if k > 1 else None,
            },
        }
        rows.append(row)
        print(
            f"K={k}: cotune {c['tokens_per_s']:.1f} tok/s, peft-seq {h['tokens_per_s']:.1f} tok/s"
            f" ({row['tokens_per_s_ratio']:.2f}x); median TTFT {c['median_ttft_s']:.3f}s vs {h['median_ttft_s']:.3f}s;"
            f" tokens equal: {row['tokens_equal']}",
            flush=True,
        )
        if not row["tokens_equal"]:
            print(f"  WARNING K={k}: cotune and PEFT tokens differ: {mism[:k]}", flush=True)
    return rows, mem


def report(rows: list[dict[str, Any]], out: Path) -> str:
    """The markdown table (one row per K) and ``throughput.png``."""
    mb = 1e6
    headers = [
        "K",
        "cotune tok/s",
        "peft-seq tok/s",
        "tok/s ÷ peft-seq",
        "cotune median TTFT s",
        "peft-seq median TTFT s",
        "TTFT ÷ peft-seq",
        "tokens equal",
        "adapter MB",
        "RSS MB per extra tenant",
    ]
    table = []
    for r in rows:
        m = r["memory"]
        per = m["rss_per_extra_tenant_bytes"]
        table.append(
            [
                r["K"],
                r["cotune"]["tokens_per_s"],
                r["peft_seq"]["tokens_per_s"],
                r["tokens_per_s_ratio"],
                r["cotune"]["median_ttft_s"],
                r["peft_seq"]["median_ttft_s"],
                r["ttft_ratio"],
                "yes" if r["tokens_equal"] else "NO",
                m["adapter_bytes"] / mb,
                None if per is None else per / mb,
            ]
        )
    ks = [r["K"] for r in rows]
    line_plot(
        out / "throughput.png",
        {
            "cotune (one batched decode)": (ks, [r["cotune"]["tokens_per_s"] for r in rows]),
            "peft-seq (one request at a time)": (ks, [r["peft_seq"]["tokens_per_s"] for r in rows]),
        },
        "tenants K (one request each)",
        "new tokens/s (median wall)",
        "SmolLM2-135M multi-tenant greedy decoding on CPU",
    )
    return markdown_table(headers, table, digits=3)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks generation", description=__doc__.split("\n")[0])
    p.add_argument("--ks", default=",".join(map(str, KS)), help="numbers of tenants (comma separated)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per request (greedy, no stop)")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed runs after one warm-up (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: K in (1, 2), 4 tokens, 1 repeat")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/generation)")
    a = p.parse_args(argv)
    ks = [int(x) for x in a.ks.split(",") if x]
    n, repeats, warmup = a.new_tokens, a.repeats, True
    if a.smoke:
        ks, n, repeats, warmup = [1, 2], 4, 1, False
    if not ks or min(ks) < 1 or n < 1 or repeats < 1:
        print("--ks, --new-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    set_offline()
    import torch

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    out = out_dir("generation", a.smoke, a.out)
    info = machine()
    (rows, mem), run = run_suite(lambda: measure(ks, n, repeats, warmup))
    text = report(rows, out)
    notes = (
        f"SmolLM2-135M-Instruct fp32, K tenants each a LoRA r={R} on {'+'.join(TARGETS)} (random weights), one real"
        f" Alpaca request per tenant, {n} new tokens each, greedy, no early stop; {repeats} timed run(s)"
        f"{' after one warm-up' if warmup else ''}, medians.\n"
        "cotune: the K requests in ONE batched decode; peft-seq: one PeftModel with the K adapters, the requests one"
        " at a time (set_adapter + generate); TTFT from the start of the run (queueing included).\n"
        f"Base weights {mem['base_bytes'] / 1e6:.0f} MB, one tenant's adapter {mem['adapter_bytes'] / 1e6:.2f} MB.\n"
        f"Physical limit: {LIMIT}."
    )
    write_json(
        out / "results.json",
        {
            "machine": info,
            "torch_threads": torch.get_num_threads(),
            **run,
            "model": MODEL,
            "lora_r": R,
            "target_modules": TARGETS,
            "weight_scale": SCALE,
            "ks": ks,
            "new_tokens": n,
            "repeats": repeats,
            "warmup": warmup,
            "smoke": a.smoke,
            "base_bytes": mem["base_bytes"],
            "adapter_bytes": mem["adapter_bytes"],
            "limit": LIMIT,
            "rows": rows,
            "notes": notes,
            "table": text,
        },
    )
    print(notes)
    print(text)
    print(machine_line(info, torch.get_num_threads(), run, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
