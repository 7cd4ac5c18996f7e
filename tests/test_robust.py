"""Canary params, circuit breakers and LAT on tiny models."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
import torch.nn.functional as F

import losses
import schedule
import optim
import robust
import train
from conftest import make_tiny
from test_train import args_for, make_ctx, step_with, pipeline_args, run_interrupted_at_step_5


@pytest.mark.parametrize("mode,kind", [("focus", "harmful"), ("protect", "harmless")])
def test_focus_and_protect_leave_the_right_entries_unchanged(tokenizer, mode, kind):
    """A one-sided step: focus moves only canary entries on the harmful side, protect moves only the
    rest on the harmless side (weight decay and Adam momentum included)."""
    model, teacher = make_tiny(tokenizer, 0), make_tiny(tokenizer, 1)
    args = args_for("--loss", "dpo=1,kl=1", "--weight-decay", "0.1", "--canary-mode", mode)
    ctx = make_ctx(model, tokenizer)
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    step = schedule.Step(0, 0, [0, 1, 2, 3], []) if kind == "harmful" else schedule.Step(0, 0, [], [0, 1, 2, 3])
    step_with(model, teacher, opt, step, ctx, args, 1.0, 1e-2)  # build up Adam momentum first
    masks = robust.canary_masks(robust.canary_scores(model, ctx.pools["harmful"].bad, 2), 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step_with(model, teacher, opt, step, ctx, args, 1.0, 1e-2, masks=masks)
    moved_canary = moved_rest = 0
    for n, p in model.named_parameters():
        changed = p.detach() != before[n]
        m = masks.get(n, torch.zeros_like(p, dtype=torch.bool))
        moved_canary += int((changed & m).sum())
        moved_rest += int((changed & ~m).sum())
    if mode == "focus":
        assert moved_rest == 0 and moved_canary > 0
    else:
        assert moved_canary == 0 and moved_rest > 0


@pytest.mark.parametrize("mode", ["focus", "protect"])
def test_canary_modes_mask_one_side_of_a_joint_step(tokenizer, mode):
    """SGD without clipping: the joint update is -lr·(γ·keep_h⊙g_h + λ·keep_b⊙g_b), checked against
    the gradients of each side taken alone and masked by hand."""
    def update(step, masks=None, **flags):
        model, teacher = make_tiny(tokenizer, 0), make_tiny(tokenizer, 1)
        args = args_for("--loss", "dpo=1,kl=1", "--optimizer", "sgd", "--clip", "0", "--canary-mode", mode,
                        "--lam", "0.5")
        ctx = make_ctx(model, tokenizer)
        opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step_with(model, teacher, opt, step, ctx, args, 2.0, 1.0, masks=masks)
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    probe = make_tiny(tokenizer, 0)
    masks = robust.canary_masks(robust.canary_scores(probe, make_ctx(probe, tokenizer).pools["harmful"].bad, 2), 0.05)
    harmful, harmless = update(schedule.Step(0, 0, [0, 1, 2, 3], [])), update(schedule.Step(0, 0, [], [0, 1, 2, 3]))
    joint = update(schedule.Step(0, 0, [0, 1, 2, 3], [0, 1, 2, 3]), masks)
    for n, d in joint.items():
        m = masks.get(n)
        if mode == "focus":
            h = harmful[n] * m if m is not None else torch.zeros_like(d)
            expected = h + harmless[n]
        else:
            expected = harmful[n] + (harmless[n] * ~m if m is not None else harmless[n])
        assert torch.allclose(d, expected, atol=1e-6), n


def test_cb_losses_match_hand_computation():
    s = [torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])]
    r = [torch.tensor([[[1.0, 1.0], [0.0, -1.0], [1.0, 1.0]]])]
    mask = torch.tensor([[True, True, False]])
    # cos: (1/√2, −1) → ReLU → (0.7071, 0); mean over 2 tokens
    assert float(losses.cb_reroute(s, r, mask)) == pytest.approx((2 ** -0.5) / 2, rel=1e-6)
    # ‖s − r‖: (1, 3); mean 2
    assert float(losses.cb_retain(s, r, mask)) == pytest.approx(2.0)
    # two layers average
    assert float(losses.cb_retain(s * 2, r * 2, mask)) == pytest.approx(2.0)


def test_lat_delta_respects_eps_raises_bad_likelihood_and_leaves_no_hook(tiny, tokenizer):
    args = args_for("--lat-eps", "2.0", "--lat-steps", "3", "--lat-layers", "0", "2")
    ctx = make_ctx(tiny, tokenizer)
    good, bad = ctx.pools["harmful"].good, ctx.pools["harmful"].bad
    feats = good + bad
    deltas = robust.lat_search(tiny, feats, len(good), layers=args.lat_layers, eps=args.lat_eps, steps=args.lat_steps)
    assert set(deltas) == {0, 2}
    for d in deltas.values():
        assert d.norm(dim=-1).max() <= 2.0 + 1e-4 and d.norm(dim=-1).max() > 1.0
    assert all(p.grad is None for p in tiny.parameters())  # the search left the weights alone
    with torch.no_grad():
        plain = losses.sequence_logps(*optim.forward(tiny, feats))
        with robust.residual_perturbation(tiny, deltas):
            attacked = losses.sequence_logps(*optim.forward(tiny, feats))
    n = len(good)
    assert attacked[n:].sum() > plain[n:].sum() and attacked[:n].sum() < plain[:n].sum()
    hooks = lambda: sum(len(m._forward_hooks) for m in tiny.modules())
    assert hooks() == 0
    with pytest.raises(RuntimeError):
        with robust.residual_perturbation(tiny, deltas):
            assert hooks() == 2
            raise RuntimeError("boom")
    assert hooks() == 0


def test_cb_lat_canary_run_logs_terms_and_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    extra = ["--no-eval", "--cb-alpha", "2", "--lat-eps", "0.5", "--canary-mode", "protect",
             "--canary-every", "level", "--canary-top", "5", "--canary-samples", "3"]
    train.run(pipeline_args(tiny_folder, tmp_path / "full", *extra))
    rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert rows[-1]["harmful_cb"] < 0.8 * rows[0]["harmful_cb"]  # rerouting pushes the bad answers' states away
    assert rows[0]["cb_coef"] == 2.0 and rows[-1]["cb_retain_coef"] == pytest.approx(2 * (7 / 8) / 2)
    assert sum(1 for r in rows if r.get("canary_gathered")) == 4  # 2 epochs × 2 levels
    # the logged drift of the canary entries, recomputed from the saved student, masks and base
    student = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    masks = load_file(str(tmp_path / "full" / "student" / "canary_masks.safetensors"))
    base = load_file(os.path.join(tiny_folder, "model.safetensors"))
    moved = sum(float((student[n].float() - base[n].float()).abs()[m.bool()].sum()) for n, m in masks.items())
    assert rows[-1]["canary_dw"] == pytest.approx(moved / sum(int(m.sum()) for m in masks.values()), rel=1e-5)
    assert rows[-1]["canary_count"] == sum(int(m.sum()) for m in masks.values())
    assert any("canary_jaccard" in r for r in rows)

    run_interrupted_at_step_5(monkeypatch, pipeline_args(tiny_folder, tmp_path / "cut", *extra))
    train.run(pipeline_args(tiny_folder, tmp_path / "cut", *extra, "--resume"))
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(path)]
    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")
