"""Shared helpers of the benchmark suites: output folders, machine facts, fresh-subprocess measurement of
peak RSS, analytic byte counts, tables and plots (matplotlib Agg).

Why peak RSS in a fresh subprocess: ``torch.profiler`` and ``tracemalloc`` do not see torch's CPU
allocations reliably, and a process that already ran other configurations keeps freed heap resident. Each
configuration therefore runs in its own interpreter (``run_isolated``) started with a fixed glibc mmap
threshold (``MALLOC_MMAP_THRESHOLD_``), so large tensors are mmapped and their pages go back to the OS when
freed; the peak of one phase is read after resetting the kernel's high-water mark (``reset_peak_rss``,
``/proc/self/clear_refs`` = 5, which also resets ``getrusage(RUSAGE_SELF).ru_maxrss``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
#: The date the published numbers were measured (docs/RESULTS.md states it with every table).
MEASURED_ON = "2026-11-23"
#: glibc: a fixed mmap threshold (bytes) disables its dynamic growth, so freed activations leave the RSS.
MMAP_THRESHOLD = 65536
RESULT_MARK = "@@BENCH-RESULT@@"


# -- places and machine ---------------------------------------------------------------------------------------
def out_dir(suite: str, smoke: bool = False, root: str | os.PathLike | None = None) -> Path:
    """``runs/bench/<suite>/`` (``.../smoke/`` for smoke runs, so they never overwrite real results)."""
    base = Path(root) if root is not None else REPO / "runs" / "bench" / suite
    out = base / "smoke" if smoke else base
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine() -> dict[str, Any]:
    """Facts a reader needs to judge a timing: cores, memory, load, library versions, date."""
    import torch

    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "measured_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    for pkg in ("transformers", "peft"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    return info


def set_offline() -> None:
    """No hub access in benchmarks (the models are packaged; see the data README)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- memory ---------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """The current resident set size of this process."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The peak RSS since start or since the last ``reset_peak_rss`` (``ru_maxrss``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``), so the next peak starts from live memory."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where the kernel does not allow it."""
    trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by ``tensors`` (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt: Any) -> int:
    """Bytes of every tensor in a torch optimizer's state (Adam moments, step counters)."""
    import torch

    return tensor_bytes(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


# -- isolated runs ----------------------------------------------------------------------------------------------
def run_isolated(
    target: str,
    kwargs: dict[str, Any],
    timeout: float = 1800,
    threads: int | None = None,
    fixed_mmap: bool = True,
) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh interpreter and return the dict it returns.

    The child starts with the fixed mmap threshold (see the module docstring; ``fixed_mmap=False`` leaves
    glibc's default, for timings: the fixed threshold page-faults every large tensor afresh and can double
    a training step's time) and ``OMP_NUM_THREADS``; it prints its JSON result after a marker line, so
    library chatter on stdout does not matter. A child that fails raises ``RuntimeError`` with the tail of
    its output.
    """
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "benchmarks._common", target, json.dumps(kwargs)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout
    if proc.returncode != 0 or RESULT_MARK not in out:
        tail = (out + proc.stderr)[-3000:]
        raise RuntimeError(f"{target}({kwargs}) failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(out.split(RESULT_MARK, 1)[1].strip().splitlines()[0])


def probe_allocation(mib: int) -> dict[str, int]:
    """Allocate and free ``mib`` MiB of torch CPU memory after a peak reset; report the measured peak rise.

    The check of this module's method (tests run it through ``run_isolated``): the rise must match the size.
    """
    import torch

    x = torch.zeros(8)  # torch's allocator and thread pools are set up before the baseline
    trim_heap()
    before = rss_bytes()
    reset = reset_peak_rss()
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)  # ones: every page is touched
    del x
    trim_heap()
    return {"before": before, "peak": peak_rss_bytes(), "after": rss_bytes(), "reset": int(reset)}


def _child(argv: list[str]) -> int:
    import importlib

    target, raw = argv
    mod, _, fn = target.partition(":")
    result = getattr(importlib.import_module(mod), fn)(**json.loads(raw))
    sys.stdout.flush()
    print(RESULT_MARK)
    print(json.dumps(result))
    return 0


# -- timing -----------------------------------------------------------------------------------------------------
def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], list[Any]]:
    """Run ``warmup`` untimed then ``steps`` timed calls; (seconds per timed call, their return values)."""
    for _ in range(warmup):
        step()
    times, outs = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs.append(step())
        times.append(time.perf_counter() - t0)
    return times, outs


T = TypeVar("T")


def run_suite(measure: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """``measure()`` and the run around it: ``{"load_average": {"before", "after"}, "total_s"}`` for results.json."""
    before = list(os.getloadavg())
    t0 = time.perf_counter()
    result = measure()
    total_s = time.perf_counter() - t0
    return result, {"load_average": {"before": before, "after": list(os.getloadavg())}, "total_s": total_s}


def machine_line(info: dict[str, Any], threads: int, run: dict[str, Any], out: Path) -> str:
    """The closing line of a suite: cores, torch threads, the load average around the run (``run_suite``'s
    record), its time, and where the results went."""
    before, after = ("/".join(f"{x:.1f}" for x in run["load_average"][k]) for k in ("before", "after"))
    return (f"machine: {info['cpu_count']} cores, torch threads {threads}, load (1/5/15 min) before {before}, after "
            f"{after}; {run['total_s']:.0f}s in all; results in {out}")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# -- output ------------------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals (one that rounds to zero prints 0.0, not -0.0), None and NaN
    as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:  # NaN
            return "—"
        return f"{v:z.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table (what the suites print and what docs/RESULTS.md quotes)."""
    cells = [[fmt(c, digits) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, default=str))
    return p


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stacked_bars(
    path: str | os.PathLike, labels: Sequence[str], parts: dict[str, Sequence[float]], ylabel: str, title: str
) -> Path:
    """A stacked bar chart: one bar per label, one segment per entry of ``parts``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) + 2), 4.5))
    bottom = [0.0] * len(labels)
    for name, vals in parts.items():
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def line_plot(
    path: str | os.PathLike, curves: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
    title: str, clip_far_out: bool = False,
) -> Path:
    """One line per entry of ``curves`` (``name -> (xs, ys)``). With ``clip_far_out`` the y axis spans the values
    inside Tukey's far-out fences (quartiles ∓ 3 interquartile ranges), so one failed run does not flatten the
    rest; a value beyond them is marked on the axis edge with its own value written beside it."""
    plt = _plt()
    outside = len(curves) > 5  # a legend of many lines inside the axes hides some of their points
    fig, ax = plt.subplots(figsize=(9 if outside else 7, 4.5))
    if len(curves) > 10:  # the default cycle's 10 colours would repeat: two lines would read as one
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    lines = {name: ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)[0]
             for name, (xs, ys) in curves.items()}
    xs_all, ys_all = ([v for c in curves.values() for v in c[i]] for i in (0, 1))
    if clip_far_out and len(ys_all) >= 4:
        q1, _, q3 = statistics.quantiles(ys_all, n=4, method="inclusive")
        lo, hi = q1 - 3 * (q3 - q1), q3 + 3 * (q3 - q1)
        inside = [y for y in ys_all if lo <= y <= hi]
        if len(inside) < len(ys_all):
            pad = 0.1 * (max(inside) - min(inside) or abs(max(inside)) or 1.0)
            bottom, top = min(inside) - pad, max(inside) + pad
            ax.set_ylim(bottom, top)
            mid = (min(xs_all) + max(xs_all)) / 2
            for name, (xs, ys) in curves.items():
                for x, y in zip(xs, ys):
                    if not bottom <= y <= top:
                        edge = bottom if y < bottom else top
                        ax.plot([x], [edge], marker="v" if y < bottom else "^", markersize=8, clip_on=False,
                                color=lines[name].get_color())
                        left = x >= mid  # the legend tends to sit on the right
                        ax.annotate(f"{name}: {y:.3g}", (x, edge), textcoords="offset points",
                                    xytext=(-6 if left else 6, 4 if y < bottom else -10), fontsize=7,
                                    ha="right" if left else "left", color=lines[name].get_color())
    ticks = sorted({x for xs, _ in curves.values() for x in xs})
    apart = all(b - a >= (ticks[-1] - ticks[0]) / 20 for a, b in zip(ticks, ticks[1:]))  # labels must not overlap
    if len(ticks) <= 8 and apart and all(float(x).is_integer() for x in ticks):  # a few whole points: seeds, evals
        ax.set_xticks(ticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight" if outside else None)
    plt.close(fig)
    return Path(path)


def panel_plot(
    path: str | os.PathLike,
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """One panel per entry of ``panels`` (``panel -> {name -> (xs, ys)}``), side by side, the same y axis."""
    plt = _plt()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.2), sharey=True, squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for name, (xs, ys) in curves.items():
            ax.plot(list(xs), list(ys), marker="o", markersize=2, label=name)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
