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


@pytest.mark.parametrize("mode,kind", [("focus", "harmful"), ("protect", "harmless")])
def test_focus_and_protect_leave_the_right_entries_unchanged(tokenizer, mode, kind):
    model, teacher = make_tiny(tokenizer, 0), make_tiny(tokenizer, 1)
    args = args_for("--loss", "dpo=1,kl=1", "--weight-decay", "0.1")
    ctx = make_ctx(model, tokenizer)
    opt = train.MasterWeightOptimizer(model, args, torch.float32)
    step = schedule.Step(kind, 0, 0, [0, 1, 2, 3])
    train.run_step(model, teacher, opt, step, ctx, args, 1.0, 1e-2)  # build up Adam momentum first
    masks = train.canary_masks(train.canary_scores(model, ctx["harmful"]["bad"], 2), 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = train.frozen_entries(opt, model, masks, mode, kind)
    train.run_step(model, teacher, opt, step, ctx, args, 1.0, 1e-2, frozen=frozen)
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
    assert train.frozen_entries(opt, model, masks, "monitor", kind) is None


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
