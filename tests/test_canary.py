"""Canary params: scores, masks, when masks are gathered, frozen entries in the optimizer, and the
state a checkpoint keeps for them."""
import copy
import json
import os

import pytest
import torch

import checkpoint
import losses
import schedule
import optim
import robust
import train
from test_train import args_for, make_ctx, pipeline_args, run_interrupted_at_step_5


def test_canary_masks_have_the_exact_share_and_match_sorting():
    torch.manual_seed(0)
    scores = {"a": torch.rand(10, 20), "b": torch.rand(7, 3), "c": torch.rand(1, 4)}
    masks = robust.canary_masks(scores, 0.1)
    for name, s in scores.items():
        k = max(1, round(s.numel() * 0.1))
        assert int(masks[name].sum()) == k
        threshold = sorted(s.flatten().tolist(), reverse=True)[k - 1]
        assert torch.equal(masks[name], s >= threshold)
    assert robust.jaccard(masks, masks) == 1.0


def test_canary_scores_saliency_is_weight_times_gradient(tiny, tokenizer):
    ctx = make_ctx(tiny, tokenizer)
    feats = ctx.pools["harmful"].bad
    scores = robust.canary_scores(tiny, feats, micro_batch=2)
    tokens = float(optim.n_response(feats).sum())
    logits, labels = optim.forward(tiny, feats)
    (-losses.sequence_logps(logits, labels).sum() / tokens).backward()
    for name, p in tiny.named_parameters():
        if p.ndim >= 2:
            assert torch.allclose(scores[name], (p * p.grad).abs(), atol=1e-7)


def wanda_by_hand(model, feats, module):
    """|W|·‖x‖ of one Linear, each example run alone (no padding), its inputs caught by a hook."""
    rows = []
    handle = module.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0][0].detach()))
    with torch.no_grad():
        for f in feats:
            model(input_ids=torch.tensor([f["input_ids"]]))
    handle.remove()
    x = torch.cat(rows)  # [all real tokens, in_features]
    assert x.shape[0] == sum(len(f["input_ids"]) for f in feats)
    return module.weight.detach().abs() * (x * x).sum(0).sqrt()[None, :]


def test_wanda_counts_real_tokens_only_whatever_the_micro_batch(tiny, tokenizer):
    feats = make_ctx(tiny, tokenizer).pools["harmful"].bad
    lengths = [len(f["input_ids"]) for f in feats]
    assert max(lengths) > 1.5 * min(lengths)  # a batch of 4 pads the short ones heavily
    one, four = (robust.canary_scores(tiny, feats, mb, "wanda") for mb in (1, 4))
    assert set(one) == set(four) and "model.layers.0.mlp.down_proj.weight" in one
    assert set(one) <= {n for n, p in tiny.named_parameters() if p.ndim >= 2}
    for name in one:  # padding changes nothing but float summation order
        assert torch.allclose(one[name], four[name], rtol=1e-5, atol=1e-6), name
    layers = tiny.model.layers
    for name, module in (("model.layers.0.self_attn.q_proj.weight", layers[0].self_attn.q_proj),
                         ("model.layers.1.mlp.down_proj.weight", layers[1].mlp.down_proj),
                         ("model.embed_tokens.weight", tiny.lm_head)):  # lm_head is tied to the embeddings
        expected = wanda_by_hand(tiny, feats, module)
        assert torch.allclose(four[name], expected, rtol=1e-5, atol=1e-6), name


# ---------------------------------------------------------------- when masks are gathered

CYCLIC_LEVELS = [0, 1, 0, 1, 0, 1]  # three batches per level, interleaved as --sequence cyclic does
LEVEL_OF_EXAMPLE = [0, 1, 0, 1]  # harmful example i belongs to level LEVEL_OF_EXAMPLE[i]


def cyclic_steps():
    members = {lv: [i for i, x in enumerate(LEVEL_OF_EXAMPLE) if x == lv] for lv in (0, 1)}
    return [schedule.Step(level, epoch, members[level], []) for epoch in (0, 1) for level in CYCLIC_LEVELS]


def run_gathers(model, ctx, every, monkeypatch, steps, canary=None, first_t=0):
    """gather_canaries along `steps`; the weights change after every step (as training would), so a
    gather that should have been a reuse gives other masks. Returns (t, scored example ids) per gather,
    the log fields and the masks in use per step."""
    args = args_for("--canary-mode", "focus", "--canary-every", every, "--canary-top", "5")
    bad = ctx.pools["harmful"].bad
    scored, real = [], robust.canary_scores

    def counting(m, feats, *rest):  # records which harmful examples each gather scores
        scored.append([next(i for i, f in enumerate(bad) if f is g) for g in feats])
        return real(m, feats, *rest)

    monkeypatch.setattr(robust, "canary_scores", counting)
    canary = canary if canary is not None else robust.CanaryState()
    fields, used, gathers = [], [], []
    for t, step in enumerate(steps, start=first_t):
        n = len(scored)
        options = robust.CanaryOptions(args.canary_every, args.canary_samples, args.canary_top, args.canary_score,
                                       args.micro_batch, args.seed)
        fields.append(robust.gather_canaries(model, canary, step, t, bad, LEVEL_OF_EXAMPLE, options))
        if len(scored) > n:
            gathers.append((t, scored[-1]))
        used.append(canary.masks)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return gathers, fields, used, canary


@pytest.mark.parametrize("every,expected", [
    # once per (epoch, level): the first batch of each level in each epoch
    ("level", [(0, [0, 2]), (1, [1, 3]), (6, [0, 2]), (7, [1, 3])]),
    ("epoch", [(0, [0, 1, 2, 3]), (6, [0, 1, 2, 3])]),
    ("batch", [(t, [0, 2] if t % 2 == 0 else [1, 3]) for t in range(12)]),
])
def test_canaries_are_gathered_once_per_scope_under_cyclic_levels(tiny, tokenizer, monkeypatch, every, expected):
    ctx = make_ctx(tiny, tokenizer)
    gathers, fields, used, _ = run_gathers(tiny, ctx, every, monkeypatch, cyclic_steps())
    assert gathers == expected
    gathered_at = {t for t, _ in expected}
    assert [bool(f.get("canary_gathered")) for f in fields] == [t in gathered_at for t in range(12)]
    assert all(f["canary_count"] > 0 for f in fields)
    if every == "level":  # steps 2 and 4 use step 0's masks, 3 and 5 step 1's; the same in epoch 1
        owner = [0, 1, 0, 1, 0, 1, 6, 7, 6, 7, 6, 7]
        assert all(used[t] is used[owner[t]] for t in range(12))
        # the two levels' masks differ, so handing level 1's masks to a level-0 step would show
        assert robust.jaccard(used[0], used[1]) < 1.0
        assert not any(used[t] is used[u] for t in range(12) for u in range(12) if owner[t] != owner[u])


def test_a_step_without_harmful_examples_keeps_the_batch_masks_it_has(tiny, tokenizer, monkeypatch):
    """A step with no harmful batch (harmless examples only) has nothing to score."""
    ctx = make_ctx(tiny, tokenizer)
    steps = [schedule.Step(0, 0, [0, 2], []), schedule.Step(0, 0, [], [1, 2]), schedule.Step(1, 0, [1, 3], [])]
    gathers, _, used, _ = run_gathers(tiny, ctx, "batch", monkeypatch, steps)
    assert gathers == [(0, [0, 2]), (2, [1, 3])] and used[1] is used[0]


def test_checkpoint_keeps_the_levels_gathered_this_epoch(tiny, tokenizer, tmp_path, monkeypatch):
    """Resume after step 3 of the cyclic sequence: the masks of both levels come back from the
    checkpoint, so the resumed run gathers at steps 6 and 7 only, as the uninterrupted one."""
    ctx = make_ctx(tiny, tokenizer)
    steps = cyclic_steps()
    args = args_for()
    opt = optim.MasterWeightOptimizer(tiny, compute_dtype=torch.float32, **train.optimizer_options(args))
    _, _, used, canary = run_gathers(tiny, ctx, "level", monkeypatch, steps[:4])
    assert canary.key == (0, 1)
    checkpoint.save(str(tmp_path / "ck"), tiny, tokenizer, opt, 4, vars(args), canary)
    state = torch.load(tmp_path / "ck" / "trainer_state.pt", weights_only=True)
    assert state["canary_key"] == (0, 1) and state["canary_stored"] == [(0, 0)]
    loaded = robust.load_canary(str(tmp_path / "ck"), state, dict(tiny.named_parameters()))
    assert loaded.key == (0, 1) and set(loaded.store) == {(0, 0), (0, 1)}
    for key, t in (((0, 0), 0), ((0, 1), 1)):
        assert set(loaded.store[key]) == set(used[t])
        assert all(torch.equal(loaded.store[key][n], used[t][n]) for n in used[t])
    assert all(torch.equal(loaded.masks[n], used[1][n]) for n in used[1])
    gathers, _, after, _ = run_gathers(tiny, ctx, "level", monkeypatch, steps[4:], canary=loaded, first_t=4)
    assert [t for t, _ in gathers] == [6, 7]
    assert all(torch.equal(after[0][n], used[0][n]) for n in used[0])  # step 4 (level 0) reuses step 0's


def test_cyclic_run_gathers_once_per_level_per_epoch_and_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    """train.run under --sequence cyclic with two batches per level: 4 gathers (2 epochs × 2 levels),
    not one per level switch; the checkpoint at step 3 falls between a level's first batch and its
    second, so the resumed run must take that level's masks from the checkpoint to match."""
    extra = ["--no-eval", "--sequence", "cyclic", "--batch-size", "2", "--canary-mode", "focus",
             "--canary-every", "level", "--canary-top", "5", "--canary-samples", "3"]
    train.run(pipeline_args(tiny_folder, tmp_path / "full", *extra))
    rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    harmful_levels = [r["level"] for r in rows]
    assert harmful_levels[:4] == [1, 2, 1, 2]  # the levels really interleave
    assert [(r["epoch"], r["level"]) for r in rows if r.get("canary_gathered")] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    run_interrupted_at_step_5(monkeypatch, pipeline_args(tiny_folder, tmp_path / "cut", *extra))
    train.run(pipeline_args(tiny_folder, tmp_path / "cut", *extra, "--resume"))
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(path)]
    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")


# ---------------------------------------------------------------- frozen entries in the optimizer

def two_param_model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 5)


@pytest.mark.parametrize("warm", [True, False], ids=["after-a-free-step", "from-the-first-step"])
def test_frozen_entries_keep_values_and_adam_moments(warm):
    """AdamW with weight decay; a mask freezes a third of the weight matrix (the bias is free) for two
    steps. Frozen entries: value, exp_avg and exp_avg_sq exactly as before the frozen steps (zero
    moments when the state did not exist yet). Free entries: what a plain AdamW gives on the same
    gradients (Adam is elementwise; clipping is off so the global norm does not couple entries)."""
    model = two_param_model()
    args = train.build_parser().parse_args(["--precision", "fp32", "--lr", "0.1", "--weight-decay", "0.1"])
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    plain_params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    plain = torch.optim.AdamW(plain_params, lr=0.1, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(3)]
    frozen = [torch.rand(model.weight.shape, generator=gen) < 1 / 3, None]
    assert 0 < int(frozen[0].sum()) < frozen[0].numel()

    def step(g, mask):
        for p, x in zip(model.parameters(), g):
            p.grad = x.clone()
        opt.step(0.1, 0.0, mask)
        for p, x in zip(plain_params, g):
            p.grad = x.clone()
        plain.step()

    if warm:
        step(grads[0], None)
    w = model.weight
    before = w.detach().clone()
    state = opt.optimizer.state.get(w, {})
    moments = {k: state[k].clone() if k in state else torch.zeros_like(w) for k in ("exp_avg", "exp_avg_sq")}
    if warm:
        assert all(m[frozen[0]].abs().min() > 0 for m in moments.values())  # decay would show
    for g in grads[1:]:
        step(g, frozen)
    f = frozen[0]
    assert torch.equal(w.detach()[f], before[f])
    for k, m in moments.items():
        assert torch.equal(opt.optimizer.state[w][k][f], m[f]), k
    # without the mask these entries move: the check above has something to catch
    assert not torch.allclose(plain_params[0].detach()[f], before[f])
    # free entries: same trajectory as plain AdamW (same kernel; float tolerance for safety)
    assert torch.allclose(w.detach()[~f], plain_params[0].detach()[~f], rtol=1e-6, atol=1e-7)
    assert torch.allclose(model.bias.detach(), plain_params[1].detach(), rtol=1e-6, atol=1e-7)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(opt.optimizer.state[w][k][~f], plain.state[plain_params[0]][k][~f],
                              rtol=1e-6, atol=1e-7), k


# ---------------------------------------------------------------- what a checkpoint keeps

def test_trainer_state_loads_with_weights_only_and_round_trips(tiny, tokenizer, tmp_path):
    args = args_for("--lr", "1e-2")
    ctx = make_ctx(tiny, tokenizer)
    opt = optim.MasterWeightOptimizer(tiny, compute_dtype=torch.float32, **train.optimizer_options(args))
    logits, labels = optim.forward(tiny, ctx.pools["harmful"].bad[:2])
    (-losses.sequence_logps(logits, labels).sum()).backward()
    opt.step(1e-2, 1.0)
    torch.manual_seed(123)
    checkpoint.save(str(tmp_path / "ck"), tiny, tokenizer, opt, 7, vars(args), robust.CanaryState())
    expected = torch.rand(5)  # what the generator gives next, at save time
    torch.rand(17)
    state = torch.load(tmp_path / "ck" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 7 and state["canary_key"] is None and state["canary_stored"] == []
    assert (state["cuda_rng"] is None) == (not torch.cuda.is_available())
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(5), expected)
    fresh = optim.MasterWeightOptimizer(copy.deepcopy(tiny), compute_dtype=torch.float32, **train.optimizer_options(args))
    fresh.optimizer.load_state_dict(state["optimizer"])
    a, b = opt.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    assert robust.load_canary(str(tmp_path / "ck"), state, dict(tiny.named_parameters())).masks is None
    assert not os.path.exists(tmp_path / "ck" / "canary_masks.safetensors")
