"""--fsdp (FSDP2) under torchrun: 2 gloo processes on CPU with the student sharded reproduce one
process, and a run resumed from a checkpoint written by the sharded run equals the uninterrupted one."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from test_ddp import cli, metrics, one_process, torchrun  # noqa: F401 (a fixture)


def test_two_sharded_processes_match_one(one_process, tiny_folder, tmp_path):
    """fp32, SGD: weights to 1e-5 as plain data parallel (a wrong reduction differs by >= 3e-5); logged
    values to 1e-4 relative (the gradient norm is summed shard by shard: ~1e-5 relative seen)."""
    torchrun(tiny_folder, tmp_path, "--fsdp")
    ra, rb = metrics(one_process), metrics(tmp_path)
    assert len(ra) == len(rb) == 8
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if k.endswith("dpo_accuracy") and abs(x[k.replace("accuracy", "margin")]) < 1e-5:
                continue  # a tie within float noise at step 0 (test_ddp.assert_same_metrics)
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (x["step"], k)
    wa = load_file(str(one_process / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


ADAMW = ("--optimizer", "adamw", "--lr", "1e-3")


@pytest.fixture(scope="module")
def adamw_runs(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("adamw")
    train.run(train.build_parser().parse_args(cli(tiny_folder, root / "one", *ADAMW)))
    torchrun(tiny_folder, root / "two", "--fsdp", *ADAMW)
    return root


def test_adamw_sharded_matches_one_process_within_float_noise(adamw_runs):
    a = load_file(str(adamw_runs / "one" / "student" / "model.safetensors"))
    b = load_file(str(adamw_runs / "two" / "student" / "model.safetensors"))
    # AdamW divides by sqrt(v): an entry whose gradient is float noise near 0 can move by up to lr
    # in either run; every other entry agrees to float noise
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    assert max(diffs) <= 1e-3 + 1e-6
    assert sorted(diffs)[len(diffs) // 2] < 1e-5
    assert len(metrics(adamw_runs / "one")) == len(metrics(adamw_runs / "two")) == 8


KILLED_AT_STEP_5 = """
import sys
sys.path.insert(0, {root!r})
import train
real, calls = train.run_step, {{"n": 0}}
def crash(*a, **k):
    calls["n"] += 1
    if calls["n"] == 5:
        raise KeyboardInterrupt
    return real(*a, **k)
train.run_step = crash
train.main(sys.argv[1:])
"""


def killed_and_resumed(tiny_folder, out, *extra):
    """A 2-process run of these flags killed at step 5 (after step 3's checkpoint), then resumed."""
    script = out.parent / "killed.py"
    script.write_text(KILLED_AT_STEP_5.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *cli(tiny_folder, out, *extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step-3"]
    torchrun(tiny_folder, out, *extra, "--resume")


def test_a_sharded_checkpoint_resumes_exactly(adamw_runs, tiny_folder, tmp_path):
    """Killed at step 5, resumed from step 3's checkpoint (gathered from the shards, Adam moments
    included, and sharded again): the same metrics and weights as the uninterrupted sharded run."""
    out = tmp_path / "run"
    killed_and_resumed(tiny_folder, out, "--fsdp", *ADAMW)
    assert metrics(out) == metrics(adamw_runs / "two")
    a = load_file(str(adamw_runs / "two" / "student" / "model.safetensors"))
    b = load_file(str(out / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_without_torchrun_or_with_lora_stops_in_one_line(tiny_folder, tmp_path):
    for extra, message in ((["--fsdp"], "^error: --fsdp shards the student over processes: run it under torchrun"),
                           (["--fsdp", "--lora-r", "4"], "^error: --fsdp with --lora-r: not built")):
        with pytest.raises(SystemExit, match=message):
            train.main(cli(tiny_folder, tmp_path / "x", *extra))


def test_sharded_student_with_offloaded_frozen_models_matches_one_process(one_process, tiny_folder, tmp_path):
    """The frozen models (good teacher, reference) streamed layer by layer from CPU memory beside a sharded
    student: the same run as one process without offloading (weights to 1e-5)."""
    torchrun(tiny_folder, tmp_path, "--fsdp", "--offload", "all")
    wa = load_file(str(one_process / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert len(metrics(tmp_path)) == 8


CANARY = ("--canary-top", "5", "--canary-samples", "3", "--canary-every", "level")


@pytest.mark.parametrize("mode, score", [("protect", "saliency"), ("focus", "wanda")])
def test_canary_masks_on_shards_match_one_process(mode, score, tiny_folder, tmp_path):
    """Canary masks scored, ranked and applied on a sharded student (SGD, fp32): the same masks, logged
    counts, overlaps and drifts as one process, and the same weights (1e-5). focus with --lam 0 leaves
    steps with the harmful side only, so the optimizer pins every other entry of each shard. Equal masks
    rest on both runs ranking the same scores: float noise at a top-k tie would flip an entry."""
    # focus: weight decay would move the pinned entries if the step did not put them back on each shard
    extra = ("--canary-mode", mode, "--canary-score", score, *CANARY,
             *(("--lam", "0", "--weight-decay", "0.1") if mode == "focus" else ()))
    train.run(train.build_parser().parse_args(cli(tiny_folder, tmp_path / "one", *extra)))
    torchrun(tiny_folder, tmp_path / "two", "--fsdp", *extra)
    ra, rb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r.get("canary_gathered", False) for r in ra] == [r.get("canary_gathered", False) for r in rb]
    assert sum(r.get("canary_gathered", False) for r in ra) == 4  # 2 epochs x 2 levels
    for x, y in zip(ra, rb):
        assert x["canary_count"] == y["canary_count"]
        for k in ("canary_jaccard", "canary_dw", "rest_dw", "grad_norm"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-7), (x["step"], k)
    ma = load_file(str(tmp_path / "one" / "student" / "canary_masks.safetensors"))
    mb = load_file(str(tmp_path / "two" / "student" / "canary_masks.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    wa = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_a_sharded_canary_run_resumes_exactly(tiny_folder, tmp_path):
    """AdamW with --canary-mode focus and --lam 0 (pinned entries keep their Adam moments on each shard),
    killed at step 5 and resumed from step 3's checkpoint (masks of both levels gathered whole, sharded
    again): the metrics, weights and masks of the uninterrupted sharded run."""
    extra = ("--fsdp", *ADAMW, "--canary-mode", "focus", "--lam", "0", *CANARY)
    torchrun(tiny_folder, tmp_path / "whole", *extra)
    out = tmp_path / "run"
    killed_and_resumed(tiny_folder, out, *extra)
    assert metrics(out) == metrics(tmp_path / "whole")
    for name in ("model", "canary_masks"):
        a = load_file(str(tmp_path / "whole" / "student" / f"{name}.safetensors"))
        b = load_file(str(out / "student" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
