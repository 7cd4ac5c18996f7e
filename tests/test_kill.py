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


def start(point, n, argv):
    """The run as a process on one thread: the runs of this file go two at a time on two cores."""
    return subprocess.Popen([sys.executable, "-c", KILLER.format(root=ROOT), point, str(n), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc):
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def argv(folder, out, *extra):
    return ["--recipe", "full", "--model", folder, "--out", str(out), "--limit", "8", "--levels", "2", "--batch-size", "2",
            "--micro-batch", "2", "--epochs", "2", "--max-new-tokens", "6", "--teacher-epochs", "1", "--force",
            "--save-every", "3", "--loss", "dpo=1,npo=0.5,kl=1", "--no-filter-pairs", "--harmless-ratio", "1",
            "--precision", "fp32", "--no-eval", *extra]


def outcome(out):
    rows = [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(out / "metrics.jsonl")]
    return rows, load_file(str(out / "student" / "model.safetensors"))


KILLS = [
    ("teacher-save", 1, []),        # killed while the bad teacher is saved: the rerun rebuilds it
    ("cache-append", 2, []),        # killed mid-line in the answer cache: the rerun drops the cut line
    ("checkpoint", 2, ["--resume"]),  # killed inside the second checkpoint: --resume starts from the first
]


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """The uninterrupted run and each killed one, then each rerun, started together (they share nothing):
    {point: (killed (returncode, stderr), rerun (returncode, stderr), folder)} and the uninterrupted folder."""
    root = tmp_path_factory.mktemp("kill")
    full = start("none", 0, argv(tiny_folder, root / "full"))
    killed = {point: start(point, n, argv(tiny_folder, root / point)) for point, n, _ in KILLS}
    code, err = finish(full)
    assert code == 0, err[-2000:]
    killed = {point: finish(proc) for point, proc in killed.items()}
    again = {point: start("none", 0, argv(tiny_folder, root / point, *then)) for point, _, then in KILLS}
    return {point: (killed[point], finish(again[point]), root / point) for point in again}, root / "full"


@pytest.mark.parametrize("point", [point for point, _, _ in KILLS])
def test_a_killed_run_recovers_to_the_uninterrupted_result(runs, point):
    (killed, again, cut), uninterrupted = runs[0][point], runs[1]
    assert killed[0] == -signal.SIGKILL, killed[1][-2000:]
    assert again[0] == 0, again[1][-2000:]
    (rows_a, weights_a), (rows_b, weights_b) = outcome(uninterrupted), outcome(cut)
    assert rows_a == rows_b and len(rows_a) == 8
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert os.listdir(cut / "checkpoints") == ["step-8"]  # nothing half-written left behind
