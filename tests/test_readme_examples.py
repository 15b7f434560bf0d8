"""Every example in README.md and examples/README.md runs as written, so the documentation cannot drift.

The ```python blocks run as they are. Each line of a ```bash block runs as a command in a scratch folder that
holds (links to) ``examples/``, as a user at the repository root would type it, with two kinds of change:

* a few commands are not run, each for the reason in ``SKIP`` (a server, or a run that takes minutes); a skipped
  ``cotune`` command must still parse with cotune's own argument parser, so its flags cannot drift either;
* training and evaluation are shortened by *appending* overrides (``TINY``, ``--limit``): later keys win, so
  the command as written is still what is parsed and run, only for a few steps.

The LLM service walkthrough (its ``sh`` and ``py`` blocks) needs a running server: ``test_service_llm.py`` runs it.

A number written in a command's comment (``# 599,232 (AdaKron, BERT-base)``) must appear in its output.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "examples" / "README.md"]
#: Command prefixes not run here, and why.
SKIP = {
    "make demo": "installs the environment and trains for minutes (CI runs `make test` itself)",
    "make test": "is this test suite",
    "cotune serve": "starts a long-running HTTP server (tested in test_service_http.py)",
    "cotune client register": "needs a running server (tested in test_service_http.py)",
    "cotune client submit": "needs a running server (tested in test_service_http.py, test_service_worker.py)",
    "cotune client metrics": "needs a running server and a job (tested in test_service_http.py)",
    "cotune worker": "needs a running server and a remote-fitter job (tested in test_service_worker.py)",
    "cotune chat --adapter DIR": "needs a causal-LM adapter, minutes to train here (tested in test_chat_command.py)",
    "cotune verify": "runs for a minute or more on 2 cores (tested in tests/test_verify*.py)",
}
TINY = ["max_steps=2", "train_limit=8", "batch_size=4", "eval_every=0", "eval_limit=4", "eval_batch_size=4",
        "save_every=1", "test=false", "--quiet"]


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(doc name, block text)`` of every fenced block in ``lang`` in the documentation."""
    out = []
    for doc in DOCS:
        for m in re.finditer(rf"^```{lang}\n(.*?)^```", doc.read_text(), flags=re.S | re.M):
            out.append((str(doc.relative_to(REPO)), m.group(1)))
    return out


def commands() -> list[tuple[str, str, str]]:
    """``(id, command, comment)`` for every command line of every bash block."""
    out = []
    for doc, text in blocks("bash"):
        for line in text.splitlines():
            cmd, _, comment = line.partition(" #")
            cmd = cmd.strip()
            if cmd and not cmd.startswith("#"):
                out.append((f"{doc}:{cmd[:60]}", cmd, comment))
    return out


def shortened(cmd: str) -> str:
    words = shlex.split(cmd)
    if words[:2] == ["cotune", "train"]:
        words += TINY
    elif words[:2] == ["cotune", "eval"]:
        words += ["--limit", "8"]
    return shlex.join(words)


def test_readme_has_examples():
    assert len(blocks("python")) >= 1 and len(commands()) >= 10


@pytest.mark.parametrize("doc,code", blocks("python"), ids=lambda v: v if v.endswith(".md") else "")
def test_python_block_runs(doc, code, tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{doc} python block", "exec"), {"__name__": "__readme__"})


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One scratch folder per document where ``examples/`` exists, as at the repository root; a document's runs
    persist from one command to the next (train, then --resume, eval, export), as they would for a reader."""
    made: dict[str, Path] = {}

    def get(doc: str) -> Path:
        if doc not in made:
            made[doc] = tmp_path_factory.mktemp(doc.replace("/", "_").replace(".", "_"))
            (made[doc] / "examples").symlink_to(REPO / "examples")
        return made[doc]

    return get


@pytest.mark.parametrize("cmd,comment", [c[1:] for c in commands()], ids=[c[0] for c in commands()])
def test_bash_command_runs(cmd, comment, workdirs, shared_data, request):
    workdir = workdirs(request.node.callspec.id.split(":")[0])
    reason = next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)
    if reason:
        if cmd.startswith("cotune "):
            from cotune.cli import build_parser

            args, extra = build_parser().parse_known_args(shlex.split(cmd)[1:])
            assert not extra, f"`{cmd}`: cotune does not accept {extra}"
        pytest.skip(f"`{cmd}` {reason}")
    assert cmd.startswith("cotune "), f"unexpected command in the docs: {cmd}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COTUNE_DATA": str(shared_data),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(shortened(cmd).replace("cotune ", f"{shlex.quote(sys.executable)} -m cotune ", 1),
                         shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
    for number in re.findall(r"\d{1,3}(?:,\d{3})+", comment):
        assert number in out.stdout, f"{cmd}: the README says {number}; output:\n{out.stdout[-2000:]}"
