"""Admission control's memory estimate (``cotune.service.admission.step_bytes``) against measured steps.

The estimate must bound a real training step's peak memory from above without refusing jobs that fit: on
configurations it was NOT fitted on (MiniLM 16 x 256, SmolLM2 2 x 384), measured <= estimate <= 1.7 x measured,
each measured as the peak RSS growth over five mixed steps in a fresh process (a server's later steps peak higher
than its first: glibc's heap keeps freed activations once its adaptive mmap threshold has risen).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cotune.service.admission import ModelShape, step_bytes

PROBE = r"""
import json, resource, sys, torch
from cotune.adapters.methods import method_configs
from cotune.models import load_model
from cotune.service.admission import ModelShape, step_bytes
from cotune.tenants import MixedBatchScheduler, MultiTenantTrainer, TenantBank
name, rows, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
causal = name == "smollm2"
torch.manual_seed(0)
model = load_model(name, "causal_lm" if causal else "seq_cls", **({} if causal else {"num_labels": 2}))
bank = TenantBank(model.eval())
bank.add_tenant("a", method_configs("lowrank", model, r=8), head=None if causal else 2)
trainer = MultiTenantTrainer(bank)
trainer.add("a")
ids = torch.randint(5, model.config.vocab_size - 1, (rows, length))
labels = ids.clone() if causal else torch.zeros(rows, dtype=torch.long)
batch = MixedBatchScheduler().collate([("a", {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})])
for p in model.parameters():  # every weight paged in before the baseline: its bytes are the base's, not the step's
    p.data.add_(0)
before = int(open("/proc/self/statm").read().split()[1]) * 4096
model.train()
for _ in range(5):
    trainer.step(batch)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
spec = {"batch_size": rows, "max_length": length, "engine": "backprop"}
print(json.dumps({"measured": peak - before, "estimate": step_bytes(ModelShape.of(model, causal), [spec])}))
"""


@pytest.mark.parametrize(("model", "rows", "length"), [("minilm", 16, 256), ("smollm2", 2, 384)])
def test_estimate_bounds_a_measured_step(model, rows, length):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, model, str(rows), str(length)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["measured"] <= got["estimate"] <= 1.7 * got["measured"], got


def test_a_mixed_step_is_the_rows_of_all_jobs_padded_to_the_longest():
    shape = ModelShape(layers=6, hidden=384, heads=12, vocab=30522, causal=False)
    short, long = {"batch_size": 8, "max_length": 64}, {"batch_size": 8, "max_length": 512}
    assert step_bytes(shape, [short, long]) == step_bytes(shape, [{"batch_size": 16, "max_length": 512}])
    assert step_bytes(shape, [short]) < step_bytes(shape, [short, short]) < step_bytes(shape, [short, long])
    zo = {**long, "engine": "zo"}
    assert step_bytes(shape, [zo]) < step_bytes(shape, [long]) / 2  # no activations kept for a backward
    causal = ModelShape(layers=30, hidden=576, heads=9, vocab=49152, causal=True, scores=False)
    assert step_bytes(causal, [short]) - step_bytes(ModelShape(30, 576, 9, 49152, False, False), [short]) == (
        12 * 8 * 64 * 49152)  # the logits, kept three times over
