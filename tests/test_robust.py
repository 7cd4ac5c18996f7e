"""Canary params, circuit breakers and LAT on tiny models."""
import json

import pytest
import torch
import torch.nn.functional as F

import losses
import schedule
import train
from conftest import make_tiny
from test_train import args_for, make_ctx, pipeline_args, run_interrupted_at_step_5


def test_canary_masks_have_the_exact_share_and_match_sorting():
    torch.manual_seed(0)
    scores = {"a": torch.rand(10, 20), "b": torch.rand(7, 3), "c": torch.rand(1, 4)}
    masks = train.canary_masks(scores, 0.1)
    for name, s in scores.items():
        k = max(1, round(s.numel() * 0.1))
        assert int(masks[name].sum()) == k
        threshold = sorted(s.flatten().tolist(), reverse=True)[k - 1]
        assert torch.equal(masks[name], s >= threshold)
    assert train.jaccard(masks, masks) == 1.0


def test_canary_scores_saliency_is_weight_times_gradient(tiny, tokenizer):
    ctx = make_ctx(tiny, tokenizer)
    feats = ctx["harmful"]["bad"]
    scores = train.canary_scores(tiny, feats, micro_batch=2)
    tokens = float(train.n_response(feats).sum())
    logits, labels = train.forward(tiny, feats)
    (-losses.sequence_logps(logits, labels).sum() / tokens).backward()
    for name, p in tiny.named_parameters():
        if p.ndim >= 2:
            assert torch.allclose(scores[name], (p * p.grad).abs(), atol=1e-7)
    wanda = train.canary_scores(tiny, feats, 2, "wanda")
    assert set(wanda) <= set(scores) and "model.layers.0.mlp.down_proj.weight" in wanda


@pytest.mark.parametrize("mode,kind", [("focus", "harmful"), ("protect", "harmless")])
def test_focus_and_protect_leave_the_right_entries_unchanged(tokenizer, mode, kind):
    """A one-sided step: focus moves only canary entries on the harmful side, protect moves only the
    rest on the harmless side (weight decay and Adam momentum included)."""
    model, teacher = make_tiny(tokenizer, 0), make_tiny(tokenizer, 1)
    args = args_for("--loss", "dpo=1,kl=1", "--weight-decay", "0.1", "--canary-mode", mode)
    ctx = make_ctx(model, tokenizer)
    opt = train.MasterWeightOptimizer(model, args, torch.float32)
    step = schedule.Step(0, 0, [0, 1, 2, 3], []) if kind == "harmful" else schedule.Step(0, 0, [], [0, 1, 2, 3])
    train.run_step(model, teacher, opt, step, ctx, args, 1.0, 1e-2)  # build up Adam momentum first
    masks = train.canary_masks(train.canary_scores(model, ctx["harmful"]["bad"], 2), 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train.run_step(model, teacher, opt, step, ctx, args, 1.0, 1e-2, masks=masks)
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
        opt = train.MasterWeightOptimizer(model, args, torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train.run_step(model, teacher, opt, step, ctx, args, 2.0, 1.0, masks=masks)
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    probe = make_tiny(tokenizer, 0)
    masks = train.canary_masks(train.canary_scores(probe, make_ctx(probe, tokenizer)["harmful"]["bad"], 2), 0.05)
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
    good, bad = ctx["harmful"]["good"], ctx["harmful"]["bad"]
    feats = good + bad
    deltas = train.lat_search(tiny, feats, len(good), args)
    assert set(deltas) == {0, 2}
    for d in deltas.values():
        assert d.norm(dim=-1).max() <= 2.0 + 1e-4 and d.norm(dim=-1).max() > 1.0
    assert all(p.grad is None for p in tiny.parameters())  # the search left the weights alone
    with torch.no_grad():
        plain = losses.sequence_logps(*train.forward(tiny, feats))
        with train.residual_perturbation(tiny, deltas):
            attacked = losses.sequence_logps(*train.forward(tiny, feats))
    n = len(good)
    assert attacked[n:].sum() > plain[n:].sum() and attacked[:n].sum() < plain[:n].sum()
    hooks = lambda: sum(len(m._forward_hooks) for m in tiny.modules())
    assert hooks() == 0
    with pytest.raises(RuntimeError):
        with train.residual_perturbation(tiny, deltas):
            assert hooks() == 2
            raise RuntimeError("boom")
    assert hooks() == 0


def test_cb_lat_canary_run_logs_terms_and_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    extra = ["--no-eval", "--cb-alpha", "2", "--lat-eps", "0.5", "--canary-mode", "protect",
             "--canary-every", "level", "--canary-top", "5", "--canary-samples", "3"]
    train.run(pipeline_args(tiny_folder, tmp_path / "full", *extra))
    rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    harmless = [r for r in rows if r["kind"] == "harmless"]
    assert all("cb" in r and r["cb"] > 0 for r in harmful) and all("cb_retain" in r for r in harmless)
    assert harmful[0]["cb_coef"] == 2.0 and rows[-1]["cb_retain_coef"] == pytest.approx(1 * 7 / 8)
    assert sum(1 for r in rows if r.get("canary_gathered")) == 4  # 2 epochs × 2 levels
    assert all(r["canary_count"] > 0 and r["canary_dw"] >= 0 for r in rows)
    assert any("canary_jaccard" in r for r in rows)
    assert (tmp_path / "full" / "student" / "canary_masks.safetensors").exists()

    run_interrupted_at_step_5(monkeypatch, pipeline_args(tiny_folder, tmp_path / "cut", *extra))
    train.run(pipeline_args(tiny_folder, tmp_path / "cut", *extra, "--resume"))
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(path)]
    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")
