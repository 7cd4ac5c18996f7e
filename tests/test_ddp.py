"""torchrun data parallel: 2 gloo processes on CPU reproduce one process at the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from test_train import run_interrupted_at_step_5

# fp32 so the tolerance measures the reduction, not bf16 rounding. Each rank runs its shard (and the
# reference beside it) in smaller batches and on one thread, which changes summation order: logged
# values agree to ~1e-7 relative, weights to 1e-5. Wrong reductions differ by >= 3e-5 in weights.
# SGD: AdamW turns float noise in near-zero gradients into ±lr steps, which would hide a wrong reduction
FLAGS = ("--no-eval", "--precision", "fp32", "--optimizer", "sgd", "--lr", "0.1")


def cli(folder, out, *extra):
    return ["--recipe", "full", "--model", folder, "--out", str(out), "--limit", "8", "--levels", "2", "--batch-size", "2",
            "--micro-batch", "2", "--epochs", "2", "--max-new-tokens", "6", "--teacher-epochs", "1", "--force",
            "--save-every", "3", "--loss", "dpo=1,npo=0.5,kl=1", "--no-filter-pairs", "--harmless-ratio", "1",
            *FLAGS, *extra]


def torchrun(folder, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "train.py"), *cli(folder, out, *extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(out):
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(out / "metrics.jsonl")]


def assert_same_metrics(ra, rb):
    """Metric rows equal up to float noise: rel 1e-5; log-prob changes are differences of two sums
    near -100, so their error is absolute. dpo_accuracy counts margins > 0: where the summed margin
    is a tie within that noise (step 0: the reference is the student), which side of 0 each
    example's margin falls on depends on the BLAS kernels, so it is not compared there."""
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            small = 1e-5 if k.endswith(("logp_change", "dpo_margin")) else 1e-6
            if k.endswith("dpo_accuracy") and abs(x[k.replace("accuracy", "margin")]) < 1e-5:
                continue
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=small), (x["step"], k)


def assert_same_run(a, b):
    ra, rb = metrics(a), metrics(b)
    assert len(ra) == len(rb) == 8
    assert_same_metrics(ra, rb)
    wa = load_file(str(a / "student" / "model.safetensors"))
    wb = load_file(str(b / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.fixture(scope="module")
def one_process(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train.run(train.build_parser().parse_args(cli(tiny_folder, out)))
    return out


def test_two_processes_match_one(one_process, tiny_folder, tmp_path):
    torchrun(tiny_folder, tmp_path)  # builds its own teachers, caches and reference log-probs
    assert_same_run(one_process, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-8"]


def test_two_processes_resume_a_one_process_run(one_process, tiny_folder, tmp_path, monkeypatch):
    shared = ["--teacher-dir", str(one_process / "teachers"), "--cache-dir", str(one_process / "cache")]
    run_interrupted_at_step_5(monkeypatch, train.build_parser().parse_args(cli(tiny_folder, tmp_path, *shared)))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-3"]
    torchrun(tiny_folder, tmp_path, *shared, "--resume")
    assert_same_run(one_process, tmp_path)


def test_ranks_meet_at_a_barrier_before_teardown_only_when_the_run_succeeds(monkeypatch):
    """A rank that destroys its gloo group while rank 0 still saves aborted at exit; on an error a barrier
    could hang the ranks that did not fail, so there is none."""
    calls = []
    monkeypatch.setattr(train.parallel, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(train.parallel, "teardown", lambda: calls.append("teardown"))
    monkeypatch.setattr(train, "run", lambda args: calls.append("run"))
    train.main([])
    assert calls == ["run", "barrier", "teardown"]
    calls.clear()

    def fail(args):
        calls.append("run")
        raise ValueError("--lr: must be positive")
    monkeypatch.setattr(train, "run", fail)
    with pytest.raises(SystemExit, match="error: --lr: must be positive"):
        train.main([])
    assert calls == ["run", "teardown"]
