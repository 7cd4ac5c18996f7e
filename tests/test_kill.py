"""Fault injection: a real run (a subprocess of train.py on the tiny checkpoint) is SIGKILLed at a
chosen point; rerunning it (or --resume when it holds a checkpoint) ends exactly where the
uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

# Runs train.main(argv) with one function wrapped so that its n-th call kills the process.
KILLER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import data, teachers, torch, train
point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = {{"n": 0}}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(module, name, before=None, after=None):
    real = getattr(module, name)
    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n and before:
            before(*a, **k)
        out = real(*a, **k)
        if calls["n"] == n and after:
            after(*a, **k)
        return out
    setattr(module, name, wrapper)

if point == "teacher-save":  # the weights file written, config and build.json not yet
    wrap(teachers, "save_file", after=lambda *a, **k: die())
elif point == "cache-append":  # half of an answer line on disk
    def half_line(path, rows):
        with open(path, "ab") as f:
            f.write(json.dumps(rows[0]).encode()[:20])
        die()
    import json
    wrap(data, "append_jsonl", before=half_line)
elif point == "checkpoint":  # a checkpoint's weights written, its trainer state not yet
    wrap(torch, "save", before=lambda *a, **k: die())
train.main(argv)
"""


def run(point, n, argv):
    return subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), point, str(n), *argv],
                          capture_output=True, text=True, timeout=600)


def argv(folder, out, *extra):
    return ["--recipe", "full", "--model", folder, "--out", str(out), "--limit", "8", "--levels", "2", "--batch-size", "2",
            "--micro-batch", "2", "--epochs", "2", "--max-new-tokens", "6", "--teacher-epochs", "1", "--force",
            "--save-every", "3", "--loss", "dpo=1,npo=0.5,kl=1", "--no-filter-pairs", "--harmless-ratio", "1",
            "--precision", "fp32", "--no-eval", *extra]


def outcome(out):
    rows = [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(out / "metrics.jsonl")]
    return rows, load_file(str(out / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_folder, tmp_path_factory):
    """The run every killed one must end as (the same for each kill point)."""
    out = tmp_path_factory.mktemp("full") / "full"
    full = run("none", 0, argv(tiny_folder, out))
    assert full.returncode == 0, full.stderr[-2000:]
    return out


@pytest.mark.parametrize("point,n,then", [
    ("teacher-save", 1, []),        # killed while the bad teacher is saved: the rerun rebuilds it
    ("cache-append", 2, []),        # killed mid-line in the answer cache: the rerun drops the cut line
    ("checkpoint", 2, ["--resume"]),  # killed inside the second checkpoint: --resume starts from the first
])
def test_a_killed_run_recovers_to_the_uninterrupted_result(tiny_folder, uninterrupted, tmp_path, point, n, then):
    killed = run(point, n, argv(tiny_folder, tmp_path / "cut"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = run("none", 0, argv(tiny_folder, tmp_path / "cut", *then))
    assert again.returncode == 0, again.stderr[-2000:]
    (rows_a, weights_a), (rows_b, weights_b) = outcome(uninterrupted), outcome(tmp_path / "cut")
    assert rows_a == rows_b and len(rows_a) == 8
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert os.listdir(tmp_path / "cut" / "checkpoints") == ["step-8"]  # nothing half-written left behind
