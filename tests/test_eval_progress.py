"""Every long evaluation shows a progress bar, generation of a causal LM included."""

from __future__ import annotations

from cotune.tasks import make_task
from cotune.tasks.progress import progress


def test_causal_lm_generation_evaluation_has_progress_bars(shared_data, capsys):
    task = make_task("causal_lm", str(shared_data / "gsm8k"), model="smollm2", max_new_tokens=2, max_length=96)
    model = task.build_model()
    rows = list(task.load("test").rows[:3])
    capsys.readouterr()
    with progress(True):
        metrics = task.evaluate(model, rows, batch_size=2)
    err = capsys.readouterr().err
    assert "exact_match" in metrics
    assert "eval" in err and "generate" in err and "2/2" in err  # 3 rows in batches of 2
    with progress(False):
        task.evaluate(model, rows[:1], batch_size=2)
    assert "generate" not in capsys.readouterr().err
