"""The server_cost and quality benchmark suites run end to end (``--smoke``), and their numbers obey the
formulas they claim: analytic byte counts, LoRA parameter counts, the peak-RSS method, GL == backprop."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

# The suites live in the repository's ``benchmarks`` package, which is not installed: import it from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from user_cli import REPO, TINY  # noqa: E402

from benchmarks import _common, quality, server_cost  # noqa: E402

MiB = 2**20
D, LAYERS, R = 384, 6, 8  # MiniLM hidden size, layers; LoRA rank of the suites


def test_markdown_table_formats_cells() -> None:
    text = _common.markdown_table(["a", "bb"], [[1.23456, None], ["x", float("nan")]], digits=2)
    assert text.splitlines() == ["| a    | bb |", "|------|----|", "| 1.23 | —  |", "| x    | —  |"]


def test_line_plot_keeps_many_lines_apart_and_ticks_only_labels_that_fit(tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    saved: list = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig.axes[0]))
    eleven = {f"method {i}": ([480, 960, 1440], [i, i + 1, i + 2]) for i in range(11)}
    _common.line_plot(tmp_path / "a.png", eleven, "update", "score", "eleven lines")
    assert len({str(line.get_color()) for line in saved[-1].get_lines()}) == 11  # the default cycle repeats at 10
    saved[-1].figure.canvas.draw()  # so many lines' legend sits right of the axes, where it hides no point
    assert saved[-1].get_legend().get_window_extent().x0 >= saved[-1].get_window_extent().x1
    assert list(saved[-1].get_xticks()) == [480, 960, 1440]  # a few whole-number points: each its own tick
    # two evaluations one update apart (a budget's last step beside a round one) would print over each other
    _common.line_plot(tmp_path / "b.png", {"a": ([533, 1066, 1599], [0, 1, 2]), "b": ([533, 1066, 1600], [0, 1, 2])},
                      "update", "score", "close points")
    assert 1599 not in list(saved[-1].get_xticks())


def test_line_plot_clips_a_far_out_value_to_the_edge_and_writes_it(tmp_path, monkeypatch) -> None:
    """AdaKron's seeds plot: a lost mixture seed at 0.097 beside trained ones at 0.82-0.87. The axis keeps to the
    trained band and the lost value stays on the figure, marked on the edge with its number."""
    from matplotlib.figure import Figure

    saved: list = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig.axes[0]))
    seeds = {"lora": ([0, 1, 2], [0.861, 0.863, 0.857]), "kron": ([0, 1, 2], [0.837, 0.840, 0.858]),
             "mix": ([0, 1, 2], [0.841, 0.847, 0.097])}
    _common.line_plot(tmp_path / "s.png", seeds, "seed", "best pearson", "seeds", clip_far_out=True)
    bottom, top = saved[-1].get_ylim()
    assert 0.097 < bottom < 0.837 and top > 0.863 and top - bottom < 0.1
    assert [t.get_text() for t in saved[-1].texts] == ["mix: 0.097"]
    _common.line_plot(tmp_path / "t.png", seeds, "seed", "best pearson", "seeds")  # off by default: every value shows
    assert saved[-1].get_ylim()[0] < 0.097 and not saved[-1].texts


def test_tensor_bytes_counts_shared_storage_once() -> None:
    import torch

    a = torch.zeros(10, 4)
    assert _common.tensor_bytes([a, a, a.view(40), torch.zeros(3, dtype=torch.float64)]) == 10 * 4 * 4 + 3 * 8


@pytest.mark.xfail(strict=False, reason="the VmHWM peak reset was seen to miss under heavy concurrent load (905 MiB "
                   "rise for 64 MiB once); benchmark memory figures come from isolated runs on a quiet machine")
def test_isolated_peak_rss_sees_a_known_allocation() -> None:
    r = _common.run_isolated("benchmarks._common:probe_allocation", {"mib": 64})
    assert r["reset"] == 1
    rise = (r["peak"] - r["before"]) / MiB
    assert 63.5 <= rise <= 64 + 12, rise  # the tensor, plus at most a few MiB of allocator/page-table noise
    assert (r["after"] - r["before"]) / MiB < 8  # freed pages went back to the OS (fixed mmap threshold)


def test_server_cost_smoke(tmp_path) -> None:
    assert server_cost.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "smoke"
    res = {r["system"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(res) == {"peft", "backprop", "gl", "gl_merged"}
    lora = LAYERS * 2 * (R * D + D * R)  # query and value: A (r x d) + B (d x r)
    assert all(r["trainable_params"] == lora for r in res.values())
    p_bytes = 4 * lora
    for sysname in ("peft", "backprop"):  # AdamW: two fp32 moments + a 4-byte step counter per tensor
        r = res[sysname]
        assert r["grad_bytes"] == p_bytes
        assert r["optimizer_state_bytes"] == 2 * p_bytes + 4 * LAYERS * 2 * 2
    tokens = 4 * 32  # smoke batch 4 x 32 tokens
    for sysname in ("gl", "gl_merged"):
        r = res[sysname]
        assert r["grad_bytes"] == 0 and r["optimizer_state_bytes"] == 0  # the server holds read-only adapters
        assert r["server_adapter_state_bytes"] == p_bytes
        assert r["pairs_bytes"] == LAYERS * 2 * tokens * (D + D) * 4  # fp32 u and δ at every site
    # merged mode keeps each adapted weight's pristine copy on the server
    assert res["gl_merged"]["weights_bytes"] - res["gl"]["weights_bytes"] == LAYERS * 2 * D * D * 4
    assert res["gl"]["weights_bytes"] == res["peft"]["weights_bytes"]
    assert (out / "memory.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "PEFT LoRA" in table and "cotune lowrank GL merged" in table


def test_quality_smoke(tmp_path) -> None:
    assert quality.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "smoke"
    res = {r["engine"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(res) == {"backprop", "gl", "zo"}
    head = D * 2 + 2  # the trained 2-class head
    assert all(r["trainable_params"] == LAYERS * 2 * 2 * R * D + head for r in res.values())
    # gradient learning follows backprop's trajectory: the same dev loss after every step, the same train loss
    gl, bp = res["gl"], res["backprop"]
    assert [s for s, _ in gl["dev_loss"]] == [s for s, _ in bp["dev_loss"]] == [1, 2]
    assert [v for _, v in gl["dev_loss"]] == pytest.approx([v for _, v in bp["dev_loss"]], rel=1e-5)
    assert [v for _, v in gl["loss"]] == pytest.approx([v for _, v in bp["loss"]], rel=1e-5)
    # MeZO moved the weights differently (its dev loss after step 2 is not backprop's)
    assert res["zo"]["dev_loss"][-1][1] != pytest.approx(bp["dev_loss"][-1][1], rel=1e-6)
    assert all(r["config"]["test"] is False for r in res.values())  # selection and scores on dev only
    assert (out / "curve_rte.png").stat().st_size > 0
    assert "RTE (acc)" in (out / "table.md").read_text()
    # --report --merge: a second folder's cell (a rerun) replaces the first folder's cell of the same key
    other = tmp_path / "rerun"
    rerun = dict(res["zo"], best=0.987654)
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"machine": {"measured_at": "elsewhere"}, "results": [rerun]}))
    saved = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(dict(saved, note="where these cells came from")))
    assert quality.main(["--report", "--out", str(tmp_path), "--smoke", "--merge", str(other)]) == 0
    assert json.loads((out / "results.json").read_text())["note"] == "where these cells came from"  # kept
    merged = json.loads((out / "results.json").read_text())["results"]
    assert len(merged) == 3 and sorted(r["best"] for r in merged if r["engine"] == "zo") == [0.987654]
    # each cell keeps the machine it was measured on; the file's own stamp is now the report's
    on = {r["engine"]: r["measured_on"] for r in merged}
    assert on["zo"] == {"measured_at": "elsewhere"} and on["backprop"] == saved["machine"]
    assert "98.8" in (out / "table.md").read_text()
    # a cell that ended but never reached results.json (its parent stopped) is rebuilt from its run's log
    kept = [r for r in merged if r["engine"] != "backprop"]
    (out / "results.json").write_text(json.dumps({"results": kept}))
    assert quality.main(["--report", "--out", str(tmp_path), "--smoke"]) == 0
    back = {r["engine"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert back["backprop"]["recovered_from"].endswith("rte_lowrank_backprop/log.jsonl")
    for key in ("best", "best_step", "trainable_params", "curve", "dev_loss", "steps"):
        assert back["backprop"][key] == bp[key], key  # the same numbers, read back from the same log
    # --engines (or --preset, --methods, --tasks) with --report keeps one claim's cells out of the merged runs
    assert quality.main(["--report", "--out", str(tmp_path), "--smoke", "--engines", "backprop,zo",
                         "--merge", str(other)]) == 0
    kept = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["engine"] for r in kept) == ["backprop", "zo"]
    assert " gl " not in (out / "table.md").read_text()


def test_quality_rejects_unknown_names(capsys) -> None:
    assert quality.main(["--tasks", "sst3"]) == 2
    assert "unknown tasks" in capsys.readouterr().out
    assert quality.main(["--merge", "runs/bench/other"]) == 2
    assert "--merge only works with --report" in capsys.readouterr().out


def test_quality_methods_train_at_their_family_default_lr_and_the_claim_preset_runs_backprop(tmp_path) -> None:
    """Every grid method builds a config, at its family's default_lr unless it names its own (full: 5e-5)."""
    from cotune.adapters.registry import get_family

    for method, (name, _, own, _) in quality.METHODS.items():
        cfg = quality.glue_config("sst2", method, "backprop", 3, 4, 32, 0, str(tmp_path / method), 1)
        family = {"pfeiffer": "bottleneck", "houlsby": "bottleneck"}.get(name, name)  # the two placement presets
        want = own if own is not None else get_family(family).config_cls.default_lr
        assert cfg.optim.lr == want, method
    assert quality.method_lr("lowrank") == 1e-3 and quality.method_lr("pfeiffer") == 1e-3
    cells = quality.glue_cells(quality.parse(["--preset", "adakron", "--tasks", "stsb"]))
    assert cells == [("stsb", m, "backprop") for m in quality.CLAIMS["adakron"][0]]
    cfg = quality.glue_config("sst2", "mlp", "gl4", 40, 4, 32, 0, str(tmp_path / "gl4"), 1)
    assert cfg.engine.name == "gl" and cfg.engine.options["interval"] == 4 and cfg.optim.warmup_steps == 1


def test_quality_curves_put_cells_of_different_intervals_on_one_update_axis(tmp_path, monkeypatch) -> None:
    """gl4's 2,880 micro-batches are backprop's 720-update schedule, so its dev curve must plot at those updates."""
    bp = quality.glue_config("stsb", "linear", "backprop", 720, 16, 128, 0, str(tmp_path / "bp"), 240)
    gl4 = quality.glue_config("stsb", "linear", "gl4", 2880, 16, 128, 0, str(tmp_path / "gl4"), 960)
    assert bp.optim.warmup_steps == gl4.optim.warmup_steps == 72
    curve = [[960, 0.78], [1920, 0.82], [2880, 0.83]]
    assert quality.curve_by_update({"engine": "gl4", "curve": curve}) == ([240, 480, 720], [0.78, 0.82, 0.83])
    assert quality.curve_by_update({"engine": "backprop", "curve": curve}) == ([960, 1920, 2880], [0.78, 0.82, 0.83])
    loss = [[10, 9.2], [20, 8.6]]  # logged every 10 micro-batches: 2.5 updates apart under I = 4
    assert quality.curve_by_update({"engine": "gl4", "loss": loss}, "loss") == ([2.5, 5.0], [9.2, 8.6])
    plotted: dict[str, dict] = {}
    monkeypatch.setattr(quality, "line_plot", lambda path, curves, *a, **k: plotted.update({Path(path).name: curves}))
    cells = [{"suite": "glue", "task": "stsb", "method": "linear", "engine": e, "curve": curve, "loss": loss,
              "config": {"batch_size": b}} for e, b in (("gl4", 16), ("backprop", 16))]
    quality.plot_curves(cells, tmp_path)  # 64 and 16 rows per update: each line says which
    assert set(plotted["curve_stsb.png"]) == {"linear gl4, 64 rows/update", "linear backprop, 16 rows/update"}
    assert plotted["loss_linear.png"]["stsb gl4, 64 rows/update"] == ([2.5, 5.0], [9.2, 8.6])
    cells[1]["config"]["batch_size"] = 64  # backprop at batch 64 is gl4's update: the labels need not say it
    quality.plot_curves(cells, tmp_path)
    assert set(plotted["curve_stsb.png"]) == {"linear gl4", "linear backprop"}


def test_quality_report_keeps_each_seed_and_tables_their_paired_gaps(tmp_path, monkeypatch) -> None:
    """ColA's three committed four-epoch seeds merge into one table: each seed's score, mean ± sd and the gap to
    LoRA with a paired t-test, all recomputed here from the raw cells by the textbook formulas; a later cell of
    the same seed still replaces an earlier one, and the same seed's two-epoch cells stay beside the four-epoch
    ones, paired only with LoRA's two-epoch cell."""
    import statistics

    from scipy.stats import t as student_t

    claim = Path(__file__).resolve().parents[1] / "docs/results/claims/cola_aux_stsb/epochs_4"
    folders = [claim, claim / "seed_1", claim / "seed_2"]
    raw = [r for f in folders for r in json.loads((f / "results.json").read_text())["results"]]
    best = {(r["method"], r["config"]["seed"]): 100 * r["best"] for r in raw}
    assert len(best) == 9
    rerun = tmp_path / "rerun"  # seed 2's linear cell again, scoring 1.0: it must replace the committed one
    cell = next(r for r in raw if r["method"] == "linear" and r["config"]["seed"] == 2)
    rerun.mkdir()
    (rerun / "results.json").write_text(json.dumps({"results": [{**cell, "best": 0.90}]}))
    best["linear", 2] = 90.0
    two_epochs = {r["method"]: 100 * r["best"] for r in json.loads((claim.parent / "results.json").read_text())[
        "results"] if r["engine"] == "backprop"}  # seed 0 at 720 steps: the same seed, another budget
    out = tmp_path / "seeds"
    argv = ["--report", "--preset", "cola_aux", "--engines", "backprop", "--tasks", "stsb", "--out", str(out)]
    assert quality.main([*argv, "--merge", *map(str, folders), str(rerun), str(claim.parent)]) == 0
    cells = [[c.strip() for c in line.split("|")[1:-1]]
             for line in (out / "table.md").read_text().split("best dev score per seed")[1].splitlines()
             if line.startswith("| ") and "method" not in line]
    rows = {c[0]: c[1:] for c in cells if c[3] == "1440"}
    assert set(rows) == {"lowrank", "linear", "mlp"}
    short = {c[0]: c[4:] for c in cells if c[3] == "720"}
    assert {m: float(v[0]) for m, v in short.items()} == pytest.approx(two_epochs, abs=0.05)
    assert short["lowrank"][1:] == ["—", "—", f"{two_epochs['lowrank']:.1f}", "—", "—", "—"]
    gap = two_epochs["lowrank"] - two_epochs["mlp"]  # paired with LoRA's own budget, not its four-epoch seed 0
    assert short["mlp"][-3:] == [f"{gap:.1f}", f"{gap:.1f}", "—"]
    for method in ("lowrank", "linear", "mlp"):
        vals = [best[method, s] for s in range(3)]
        engine, lr, steps, *seeds, mean_sd, gaps, mean_gap, p = rows[method]
        assert (engine, steps, lr) == ("backprop", "1440", "3e-3" if method == "lowrank" else "3e-4")
        assert seeds == [f"{v:.1f}" for v in vals]
        mean = sum(vals) / 3
        assert mean_sd == f"{mean:.1f} ± {(sum((v - mean) ** 2 for v in vals) / 2) ** 0.5:.1f}"
        if method == "lowrank":
            assert (gaps, mean_gap, p) == ("—", "—", "—")
            continue
        d = [best["lowrank", s] - best[method, s] for s in range(3)]
        tstat = statistics.mean(d) / (statistics.stdev(d) / 3**0.5)
        assert gaps == " / ".join(f"{x:.1f}" for x in d) and mean_gap == f"{sum(d) / 3:.1f}"
        assert p == f"{2 * student_t.sf(abs(tstat), df=2):.2f}"
    main_table = (out / "table.md").read_text().split("best dev score per seed")[0]
    assert "| 3     |" in main_table and "| steps |" in main_table  # the seeds column; a row per budget
    assert (out / "seeds_stsb.png").exists()
    merged = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["method"], r["config"]["seed"]) for r in merged if r["steps"] == 1440) == sorted(best)
    assert len(merged) == 12  # 9 four-epoch cells and 3 two-epoch ones, none lost
    plotted: dict[str, dict] = {}  # every cell keeps its own line: seed 0's two budgets are named apart
    monkeypatch.setattr(quality, "line_plot", lambda path, curves, *a, **k: plotted.update({Path(path).name: curves}))
    assert quality.main(["--report", "--out", str(out)]) == 0
    assert len(plotted["curve_stsb.png"]) == 12 and len(plotted["loss_lowrank.png"]) == 4
    assert {"lowrank backprop, seed 0, lr 3e-3, 720 steps", "lowrank backprop, seed 0, lr 3e-3, 1440 steps",
            "lowrank backprop, seed 1"} <= set(plotted["curve_stsb.png"])
    assert plotted["seeds_stsb.png"]["lowrank backprop 3e-3, 1440 steps"][0] == (0, 1, 2)


def test_quality_tables_order_rows_by_rate_and_budget_as_numbers() -> None:
    """A method run at several rates lists them as numbers (3e-4, 1e-3, 1.5e-3, 3e-3: as text 1.5e-3 would come
    first and 3e-4 last), and a cell that recorded no rate or steps sorts first instead of failing the sort."""
    claim = Path(__file__).resolve().parents[1] / "docs/results/claims/cola_aux_stsb/epochs_4"
    lora = next(r for r in json.loads((claim / "results.json").read_text())["results"] if r["method"] == "lowrank")
    cells = [{**lora, "config": {**lora["config"], "optim": {**lora["config"]["optim"], "lr": lr}}}
             for lr in (1.5e-3, 3e-4, 3e-3, 1e-3)]
    old = {k: v for k, v in lora.items() if k not in ("steps", "config", "lr")}  # recorded neither
    for table in (quality.glue_table([*cells, old]), quality.seeds_table([*cells, old])):
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
                if line.startswith("| lowrank")]
        assert [r[2] for r in rows[:5]] == ["—", "3e-4", "1e-3", "1.5e-3", "3e-3"]
        assert rows[0][3] in ("", "—") and {r[3] for r in rows[1:]} == {"1440"}


def test_quality_gaps_that_round_to_zero_print_without_a_sign() -> None:
    """Pfeiffer's seed-0 gap to LoRA is -0.04 points: the table prints 0.0 (a sign on a zero reads as a finding)."""
    claim = Path(__file__).resolve().parents[1] / "docs/results/claims/adakron_stsb/epochs_4/seeds"
    cells = [r for r in json.loads((claim / "results.json").read_text())["results"]
             if r["method"] in ("lowrank", "pfeiffer") and quality.seed_of(r) == 0]
    assert -0.05 < 100 * (cells[0]["best"] - cells[1]["best"]) < 0.05 and cells[0]["best"] != cells[1]["best"]
    row = next(line for line in quality.seeds_table(cells).splitlines() if line.startswith("| pfeiffer"))
    assert "-0.0" not in row and [c.strip() for c in row.split("|")[1:-1]][-3:-1] == ["0.0", "0.0"]
    assert _common.fmt(-0.04, 1) == "0.0" and _common.fmt(-0.06, 1) == "-0.1"


def test_quality_lr_replaces_every_cells_family_default(tmp_path, monkeypatch) -> None:
    """``--lr`` reaches each cell (a claim's column at another rate); without it a cell gets None, its default."""
    seen: list[dict] = []

    def cell(**kw):
        seen.append(kw)
        return {"suite": "glue", "task": kw["task"], "method": kw["method"], "engine": kw["engine"], "metric": "acc",
                "best": 0.5, "best_step": 1, "trainable_params": 1, "train_seconds": 0.0, "steps": 2, "curve": [],
                "loss": [], "dev_loss": []}

    monkeypatch.setattr(quality, "run_cell", cell)
    monkeypatch.setattr(quality, "report", lambda results, out: "")
    assert quality.main(["--smoke", "--lr", "3e-3", "--out", str(tmp_path)]) == 0
    assert len(seen) == 3 and {kw["lr"] for kw in seen} == {3e-3}
    assert quality.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert {kw["lr"] for kw in seen[3:]} == {None}


def test_quality_llm_smoke(tmp_path) -> None:
    assert quality.main(["--smoke", "--suite", "llm", "--out", str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "smoke" / "results.json").read_text())["results"]
    assert (r["suite"], r["task"], r["metric"], r["steps"]) == ("llm", "gsm8k", "exact_match", 2)
    # LoRA r 8 on SmolLM2's q_proj (576 -> 576) and v_proj (576 -> 192, grouped-query) in all 30 layers
    assert r["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["best"] <= 1.0
    assert r["mmlu_rows"] == 4 and 0.0 <= r["mmlu_before"] <= 1.0 and 0.0 <= r["mmlu_after"] <= 1.0
    assert (r["method"], r["engine"], r["device"]) == ("lowrank", "backprop", "cpu")
    assert 0.0 <= r["mmlu_letter_before"] <= 1.0 and 0.0 <= r["mmlu_letter_after"] <= 1.0
    assert r["config"]["test"] is False and r["config"]["train_limit"] == 8
    assert "gsm8k" in (tmp_path / "smoke" / "table.md").read_text()
    assert quality.main(["--suite", "llm", "--llm-tasks", "gsm9k"]) == 2


def test_quality_llm_rejects_engines_it_cannot_train_with(tmp_path, capsys, monkeypatch) -> None:
    """An llm run with only --engines zo used to train no cell and say nothing."""
    monkeypatch.setattr(quality, "run_isolated", lambda *a, **k: pytest.fail("no cell may start"))
    assert quality.main(["--suite", "llm", "--engines", "zo", "--out", str(tmp_path)]) == 2
    assert "--suite llm trains with backprop or gl, not ['zo']" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()


def test_quality_llm_claim_methods_have_the_papers_parameter_counts() -> None:
    """CoLA's claim on SmolLM2 (``--preset cola``): LoRA, HydraLoRA and CoLA 2|3 on the same seven linear layers of
    every decoder layer, counted by formula: LoRA r(d_in + d_out); HydraLoRA one A, N B's and an N-way router
    (N d_in); CoLA M A's and N B's."""
    from cotune.adapters import attach
    from cotune.adapters.attach import trainable_parameters
    from cotune.models import load_model

    args = quality.parse(["--suite", "llm", "--preset", "cola"])
    assert quality.LLM_CLAIMS[args.preset] == ["lowrank_all", "hydra", "cola"]
    # SmolLM2-135M: hidden 576, grouped-query k/v 192, MLP 1536, 30 layers
    d_in = {"q_proj": 576, "k_proj": 576, "v_proj": 576, "o_proj": 576, "gate_proj": 576, "up_proj": 576,
            "down_proj": 1536}
    d_out = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 1536, "up_proj": 1536,
             "down_proj": 576}
    sin, sout, r, layers = sum(d_in.values()), sum(d_out.values()), 8, 30
    want = {"lowrank_all": r * (sin + sout), "hydra": r * sin + 3 * r * sout + 3 * sin,
            "cola": 2 * r * sin + 3 * r * sout}
    for method in quality.LLM_CLAIMS["cola"]:
        name, options = quality.LLM_METHODS[method]
        model = attach(load_model("smollm2", "causal_lm"), name, **options)
        got = sum(p.numel() for p in trainable_parameters(model).values())
        assert got == layers * want[method], method
    assert quality.main(["--suite", "llm", "--llm-methods", "lora"]) == 2


def test_quality_keeps_finished_cells_when_one_times_out(tmp_path, monkeypatch) -> None:
    """A cell that runs past --cell-timeout is recorded as failed; the cells that finished are saved and scored."""
    import subprocess

    def fake_run_isolated(target, kw, timeout):
        assert timeout == 5.0
        if kw["engine"] == "gl":
            raise subprocess.TimeoutExpired(["python"], timeout)
        return {"suite": "glue", "task": kw["task"], "method": kw["method"], "engine": kw["engine"],
                "metric": "accuracy", "best": 0.625, "best_step": 3, "trainable_params": 74498,
                "train_seconds": 1.0, "curve": [(3, 0.625)], "loss": [(3, 0.69)], "dev_loss": [(3, 0.7)]}

    monkeypatch.setattr(quality, "run_isolated", fake_run_isolated)
    argv = ["--tasks", "rte", "--methods", "lowrank", "--engines", "backprop,gl", "--steps", "3", "--jobs", "2",
            "--cell-timeout", "5", "--out", str(tmp_path)]
    assert quality.main(argv) == 1  # a failed cell makes the run's exit code 1
    res = {r["engine"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert "timed out after 5.0 seconds" in res["gl"]["error"]
    assert res["backprop"]["best"] == 0.625 and "62.5" in (tmp_path / "table.md").read_text()


def test_cola_image_smoke(tmp_path) -> None:
    from benchmarks import cola_image

    assert cola_image.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "smoke"
    saved = json.loads((out / "results.json").read_text())
    cells = {(r["base"], r["method"]): r for r in saved["results"]}
    assert set(cells) == {(b, m) for b in cola_image.BASES for m in cola_image.METHODS}
    assert all("error" not in r and 0.0 <= r["test_accuracy"] <= 1.0 for r in cells.values())
    assert all(0.0 <= r["zero_shot_accuracy"] <= 1.0 for (_, m), r in cells.items() if m == "lora")
    # the adapter methods never touched the frozen random base; full training trains all of it
    assert all(r["base_unchanged"] for (_, m), r in cells.items() if m != "full")
    assert all(r["trainable_params"] == r["base_params"] for (_, m), r in cells.items() if m == "full")
    # LoRA r 8 on every Linear of the base: (784 -> 10); (784 -> 128, 128 -> 256, 256 -> 10); the CNN's (512 -> 10)
    lora = {b: cells[(b, "lora")]["trainable_params"] for b in cola_image.BASES}
    assert lora == {"linear": 8 * 794, "mlp": 8 * (912 + 384 + 266), "cnn": 8 * 522}
    assert cells[("linear", "cola_linear")]["trainable_params"] == 784 * 10  # full-rank, no bias
    assert set(saved["lr"]) == {"full", "lowrank", "linear", "mlp"} and len(saved["lr_check"]) == 4 * 2
    # gl equals backprop: LoRA and ColA low rank take the same steps on every base
    assert [c["base"] for c in saved["gl_check"]] == list(cola_image.BASES)
    for c in saved["gl_check"]:
        assert c["max_loss_gap"] < 1e-5 and c["final_weight_gap"] < 1e-5
        assert c["test_accuracy_backprop"] == c["test_accuracy_gl"]
    assert (out / "curves.png").stat().st_size > 0 and "ColA MLP" in (out / "table.md").read_text()
    # --report --merge: a rerun's cell replaces the same (base, method)
    other = tmp_path / "rerun"
    other.mkdir()
    rerun = dict(cells[("mlp", "cola_mlp")], test_accuracy=0.98765)
    (other / "results.json").write_text(json.dumps({"results": [rerun]}))
    assert cola_image.main(["--report", "--smoke", "--out", str(tmp_path), "--merge", str(other)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert len(merged["results"]) == 15 and "98.8" in (out / "table.md").read_text()
    assert cola_image.main(["--merge", str(other)]) == 2 and cola_image.main(["--bases", "vgg"]) == 2


def test_mmlu_check_interval_is_wilsons() -> None:
    from benchmarks import mmlu_check

    lo, hi = mmlu_check.interval(0.286, 1140)  # Wilson's formula by hand: centre 0.2866, half-width 0.0262
    assert abs(lo - 0.2604) < 5e-4 and abs(hi - 0.3128) < 5e-4
    lo, hi = mmlu_check.interval(0.0, 10)  # no successes: [0, z^2 / (n + z^2)]
    assert abs(lo) < 1e-12 and abs(hi - 1.96**2 / (10 + 1.96**2)) < 1e-12


def test_mmlu_check_smoke(tmp_path) -> None:
    from benchmarks import mmlu_check

    assert mmlu_check.main(["--smoke", "--out", str(tmp_path), "--threads", "1"]) == 0
    out = tmp_path / "smoke"
    cells = {(c["scoring"], c["n_shot"]): c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == {("cloze", 0), ("letter", 0)}
    for c in cells.values():  # 2 questions of each of the first 3 subjects, scored out of 4 options
        assert c["rows"] == 6 and c["accuracy"] in {i / 6 for i in range(7)}
        assert c["interval"][0] <= c["accuracy"] <= c["interval"][1]
    assert "accuracy_norm" in cells[("cloze", 0)] and "accuracy_norm" not in cells[("letter", 0)]
    # --merge keeps the cells this run does not measure; --report rebuilds the plot from the file
    assert mmlu_check.main(["--smoke", "--out", str(tmp_path), "--merge", "--scorings", "letter",
                            "--threads", "1"]) == 0
    merged = json.loads((out / "results.json").read_text())["cells"]
    assert [(c["scoring"], c["n_shot"]) for c in merged] == [("cloze", 0), ("letter", 0)]
    (out / "mmlu_check.png").unlink()
    assert mmlu_check.main(["--smoke", "--out", str(tmp_path), "--report"]) == 0
    assert (out / "mmlu_check.png").stat().st_size > 0


def test_adapter_scale_tells_a_working_adapter_from_one_that_collapses_every_token(tmp_path) -> None:
    """AdaKron's lost seed 5: the adapter's output grew to 36-44x the frozen layer's and every token state after it
    became one vector, so the head predicted a constant. A briefly trained adapter must read as neither; the same
    adapter adding one large constant vector to every token (its up bias) must read as both."""
    from safetensors.torch import load_file, save_file

    from benchmarks import adapter_scale
    from cotune.cli import main as cotune

    run = tmp_path / "run"
    assert cotune(["train", str(REPO / "examples" / "adakron_minilm_mrpc.yaml"), *TINY, "eval_every=0",
                   "save_every=0", f"output_dir={run}", "--quiet"]) == 0
    constant = run / "constant"
    shutil.copytree(run / "adapter", constant)
    weights = load_file(constant / "adapter_model.safetensors")
    big = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 1e3
    save_file({k: big.clone() if k.endswith("up.bias") else v for k, v in weights.items()},
              str(constant / "adapter_model.safetensors"))
    assert adapter_scale.main(["--adapter", str(run / "adapter"), "--adapter", str(constant), "--rows", "16",
                               "--out", str(tmp_path / "out")]) == 0
    trained, blown = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert len(trained["sites"]) == len(trained["token_cosine"]) == LAYERS  # one adapter after each FFN
    assert all(s["ratio"] < 0.5 for s in trained["sites"].values()) and max(trained["token_cosine"]) < 0.9
    assert all(s["ratio"] > 100 for s in blown["sites"].values()) and min(blown["token_cosine"]) > 0.99
    assert blown["prediction_sd"] < 0.01 * trained["prediction_sd"]  # the head reads one vector
    first = "bert.encoder.layer.0.output.dense"  # its input comes before any adapter: the same in both models
    assert blown["sites"][first]["base"] == pytest.approx(trained["sites"][first]["base"], rel=1e-5)
    assert "constant" in (tmp_path / "out" / "table.md").read_text()


def by_name(res: dict) -> dict:
    return {c["cell"]: c for c in res["cells"]}


def test_mezo_prompt_smoke(tmp_path) -> None:
    from benchmarks import mezo_prompt

    cells = ["lowrank_zo_sgd", "lowrank_backprop"]
    args = ["--smoke", "--out", str(tmp_path), "--threads", "1", "--prompt", "review", "--n-directions", "2"]
    assert mezo_prompt.main([*args, "--cells", *cells]) == 0
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["zero_shot"] <= 1.0 and [c["cell"] for c in res["cells"]] == cells
    by = by_name(res)
    assert res["template"] == mezo_prompt.PROMPTS["review"][0] and res["cells"][0]["n_directions"] == 2
    # a run stopped before writing its results: --collect rebuilds its cell from the training log
    shutil.copytree(out / "runs" / "lowrank_zo_sgd", tmp_path / "stopped" / "runs" / "lowrank_zo_sgd_again")
    assert mezo_prompt.main(["--collect", str(out), str(tmp_path / "stopped"), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    again = merged["cells"][-1]
    assert [c["cell"] for c in merged["cells"]] == [*cells, "lowrank_zo_sgd_again"]
    assert merged["zero_shot"] == res["zero_shot"] and again["stopped_at"] == 2 and again["n_directions"] == 2
    assert again["curve"] == res["cells"][0]["curve"]
    assert again["trainable_params"] == by["lowrank_zo_sgd"]["trainable_params"]
    # r 8 on SmolLM2's default targets, the same adapter for both engines; only the engine differs
    assert by["lowrank_zo_sgd"]["trainable_params"] == by["lowrank_backprop"]["trainable_params"] > 0
    assert by["lowrank_zo_sgd"]["lr"] == mezo_prompt.CELLS["lowrank_zo_sgd"][-1]
    assert all(c["best_step"] in (None, 2) and c["curve"] for c in res["cells"])
    assert (out / "mezo_prompt.png").stat().st_size > 0


def test_lr_sweep_keeps_the_current_rate_unless_another_wins_by_the_margin() -> None:
    from benchmarks.lr_sweep import chosen

    cells = [{"lr": 3e-4, "best": 0.80}, {"lr": 1e-3, "best": 0.805}, {"lr": 3e-3, "best": 0.812},
             {"lr": 1e-2, "error": "diverged"}]
    assert chosen(cells, 1e-3, margin=1.0)["lr"] == 1e-3  # 0.7 points better is noise on 300 rows
    assert chosen(cells, 1e-3, margin=0.5)["lr"] == 3e-3
    assert chosen(cells, 5e-4, margin=1.0)["lr"] == 3e-3  # the current rate was not measured: the best wins
    assert chosen([{"lr": 1e-3, "error": "x"}], 1e-3, margin=1.0) is None


def test_lr_sweep_across_tasks_takes_the_rate_no_task_loses_much_with() -> None:
    from benchmarks.lr_sweep import across

    def sweep(task, scores, chosen):
        cells = [{"method": m, "lr": lr, "best": b} for m, at in scores.items() for lr, b in at.items()]
        return {"task": task, "cells": cells, "chosen": chosen}

    sst2 = sweep("sst2", {"kron": {1e-3: 0.78, 3e-3: 0.77}, "linear": {3e-4: 0.82, 1e-3: 0.84, 3e-3: 0.80},
                          "lowrank": {1e-3: 0.79, 3e-3: 0.82}}, {"kron": 1e-3, "linear": 1e-3, "lowrank": 3e-3})
    stsb = sweep("stsb", {"kron": {1e-4: 0.9, 1e-3: 0.27, 3e-3: 0.86}, "linear": {3e-4: 0.82, 1e-3: 0.30}},
                 {"kron": 1e-4, "linear": 3e-4})
    # kron: 1e-4 won STS-B but SST-2 never measured it; of the common rates, 3e-3 loses 1 point where 1e-3 loses 59
    # linear: 3e-4 loses 2 points on SST-2, 1e-3 loses 52 on STS-B; lowrank: swept once, that sweep's choice
    assert across([sst2, stsb]) == {"kron": 3e-3, "linear": 3e-4, "lowrank": 3e-3}
    assert across([sst2]) == sst2["chosen"]
    # STS-B again at three times the budget: 1e-3 only started late. The longer run speaks for STS-B (the short
    # one would still make 1e-3 lose 59 points), so 1e-3's largest loss is 2 points (STS-B), 3e-3's 3 (CoLA).
    stsb_long = dict(sweep("stsb", {"kron": {1e-3: 0.84, 3e-3: 0.86}}, {"kron": 3e-3}), steps=720)
    stsb["steps"] = 240
    cola = sweep("cola", {"kron": {1e-3: 0.17, 3e-3: 0.14}}, {"kron": 1e-3})
    assert across([sst2, stsb, cola])["kron"] == 3e-3
    assert across([sst2, stsb, stsb_long, cola])["kron"] == across([stsb_long, sst2, cola, stsb])["kron"] == 1e-3
    # a family swept on one task at two budgets keeps the longer sweep's choice
    assert across([stsb, stsb_long])["kron"] == across([stsb_long, stsb])["kron"] == 3e-3
    assert across([stsb, dict(stsb_long, chosen={"kron": 1e-3})])["kron"] == 1e-3


def test_lr_sweep_takes_a_quality_runs_cells_of_the_same_task_budget_and_families() -> None:
    from benchmarks.lr_sweep import merged_cells

    sweep = {"task": "cola", "steps": 1600, "batch": 16, "cells": [{"method": "lowrank", "lr": 1e-3, "factor": 1 / 3}]}

    def cell(task="cola", method="lowrank", engine="backprop", steps=1600, batch=16, **extra):
        return {"suite": "glue", "task": task, "method": method, "engine": engine, "steps": steps, "lr": 3e-3,
                "config": {"batch_size": batch}, "best": 0.084, "best_step": 1600, "final": 0.084, "curve": [],
                "trainable_params": 74_498, "train_seconds": 1.0, "seconds": 2.0, **extra}

    others = [cell(task="rte"), cell(method="full"), cell(engine="gl"), cell(steps=300), cell(batch=32),
              cell(error="boom")]
    (got,) = merged_cells({"results": [cell(), *others]}, sweep)
    assert got == {"method": "lowrank", "factor": 1.0, "lr": 3e-3, "best": 0.084, "best_step": 1600, "final": 0.084,
                   "curve": [], "trainable_params": 74_498, "train_seconds": 1.0, "seconds": 2.0}
    assert merged_cells({"cells": sweep["cells"]}, sweep) == sweep["cells"]  # another sweep's cells as they are


def test_lr_sweep_merge_keeps_each_familys_factors_relative_to_its_own_centre() -> None:
    from benchmarks.lr_sweep import merge

    res = {"task": "mrpc", "steps": 690, "batch": 16, "cells": [{"method": "lowrank", "lr": 1e-3, "factor": 1.0}]}
    quality = {"results": [{"suite": "glue", "engine": "backprop", "task": "mrpc", "steps": 690, "lr": lr,
                            "method": m, "config": {"batch_size": 16}, "best": 0.8, "best_step": 690, "final": 0.8,
                            "curve": [], "trainable_params": 1, "train_seconds": 1.0, "seconds": 1.0}
                           for m, lr in (("lowrank", 3e-3), ("kron", 3e-3))]}
    merge(res, quality)  # kron is not in the sweep yet: its quality cell stays out
    merge(res, {"cells": [{"method": "kron", "lr": 1e-3, "factor": 1.0, "best": 0.79}]})  # a kron sweep centred on 1e-3
    merge(res, quality)  # now kron's 3e-3 joins, three times kron's centre, not at factor 1 beside its 1e-3 cell
    assert sorted((c["method"], c["lr"], c["factor"]) for c in res["cells"]) == [
        ("kron", 1e-3, 1.0), ("kron", 3e-3, 3.0), ("lowrank", 1e-3, 1.0), ("lowrank", 3e-3, 3.0)]


def test_lr_sweep_smoke(tmp_path) -> None:
    from benchmarks import lr_sweep

    assert lr_sweep.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())
    (cell,) = res["cells"]
    assert cell["method"] == "lowrank" and cell["lr"] == quality.method_lr("lowrank") and 0 <= cell["best"] <= 1
    assert cell["trainable_params"] > 0 and (out / "lr_sweep.png").stat().st_size > 0
    assert res["chosen"] == {"lowrank": cell["lr"]}
    # --merge: a run centred elsewhere joins at its factor relative to this run's centre, and can win
    other = tmp_path / "edge"
    other.mkdir()
    edge = dict(cell, lr=10 * cell["lr"], factor=1.0, best=cell["best"] + 0.05)
    (other / "results.json").write_text(json.dumps({"cells": [edge]}))
    assert lr_sweep.main(["--report", "--out", str(tmp_path), "--smoke", "--merge", str(other)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert sorted(c["factor"] for c in merged["cells"]) == [1.0, 10.0]
    assert merged["chosen"] == {"lowrank": edge["lr"]}
    assert lr_sweep.main(["--methods", "lora"]) == 2 and lr_sweep.main(["--merge", str(tmp_path)]) == 2


def test_expert_soup_smoke(tmp_path) -> None:
    from benchmarks import expert_soup
    from cotune.adapters import make_config
    from cotune.adapters.families.kron import Kron

    assert expert_soup.main(["--smoke", "--out", str(tmp_path)]) == 0
    (res,) = json.loads((tmp_path / "smoke" / "results.json").read_text())["results"]
    ways = ["soup", "expert 0", "expert 1", "routed per sequence"]
    assert res["mixture"] == "full" and res["metric"] == "accuracy" and all(w in res for w in ways)
    assert all(0.0 <= res[w]["accuracy"] <= 1.0 for w in ways)
    assert set(res["spread"]) == {"down_a", "down_v"} and all(v > 0 for v in res["spread"].values())  # trained apart
    ad = Kron(make_config("kron", r=8, mixture="partial", num_experts=3), 16, 16)
    assert expert_soup.spread([ad])["down_a"] == pytest.approx(0.0, abs=1e-6)  # experts start as copies
    with torch.no_grad():
        ad.down_a.weight[1] *= 3  # one expert at 3x the others: mean 5/3, distances 2/3, 4/3, 2/3 of one expert
    assert expert_soup.spread([ad])["down_a"] == pytest.approx((2 / 3 + 4 / 3 + 2 / 3) / 3 / (5 / 3), rel=1e-5)
