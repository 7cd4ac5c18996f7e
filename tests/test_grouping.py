import numpy as np
import pytest
import torch

import schedule
import optim
import train
from conftest import make_tiny
from test_train import args_for, make_ctx, step_with

LENGTHS = [int(x) for x in np.random.default_rng(3).integers(5, 200, size=60)]  # mixed lengths


def padded_tokens(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_each_come_from_one_bucket():
    indices = [int(i) for i in np.random.default_rng(0).permutation(60)]
    batches = schedule.length_grouped(indices, LENGTHS, 4, 3, np.random.default_rng(1))
    buckets = [set(indices[i:i + 12]) for i in range(0, 60, 12)]
    assert sorted(i for b in batches for i in b) == list(range(60)) and all(len(b) == 4 for b in batches)
    for bucket in buckets:
        inside = [b for b in batches if set(b) <= bucket]
        assert len(inside) == 3  # every batch lies in one bucket, 3 per bucket
        spans = sorted((min(LENGTHS[i] for i in b), max(LENGTHS[i] for i in b)) for b in inside)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # within a bucket, lengths do not interleave


def plan(seed=0, group=4, sequence="sequential", **kw):
    levels = schedule.assign_levels(60, 3, "random", seed)
    return levels, schedule.build_plan(levels, 30, epochs=2, batch_size=4, sequence=sequence, seed=seed,
                                       group_by_length=group, lengths=(LENGTHS, LENGTHS[:30]), **kw)


@pytest.mark.parametrize("sequence", ["sequential", "cyclic", "mixed"])
def test_grouped_plan_sees_every_example_once_per_epoch_and_is_seeded(sequence):
    levels, steps = plan(sequence=sequence)
    for epoch in range(2):
        harmful = [s for s in steps if s.epoch == epoch]
        assert sorted(i for s in harmful for i in s.harmful) == list(range(60))
        assert all(levels[i] == s.level for s in harmful for i in s.harmful)
    harmless = np.bincount([i for s in steps for i in s.harmless], minlength=30)
    assert harmless.min() == harmless.max() == 2 * 3  # the whole pool at each of 3 levels, 2 epochs
    assert [(s.harmful, s.harmless) for s in plan(sequence=sequence)[1]] == [(s.harmful, s.harmless) for s in steps]
    assert [s.harmful for s in plan(seed=1, sequence=sequence)[1]] != [s.harmful for s in steps]


def test_grouping_pads_less_than_random_batches():
    grouped, random = plan(group=4)[1], plan(group=0)[1]
    for side, lengths in (("harmful", LENGTHS), ("harmless", LENGTHS[:30])):
        a, b = [getattr(s, side) for s in grouped], [getattr(s, side) for s in random]
        assert sorted(map(sorted, a)) != sorted(map(sorted, b))
        assert padded_tokens(a, lengths) < 0.5 * padded_tokens(b, lengths), side


def test_grouping_needs_lengths():
    with pytest.raises(ValueError, match="--group-by-length"):
        schedule.build_plan([0, 0, 1], 2, group_by_length=2)


@pytest.mark.parametrize("budget,rows", [(400, 1), (400, 2), (1000, 2), (199, 1)])
def test_micro_batches_stay_within_the_budget_and_cover_the_batch(budget, rows):
    batch = list(range(10, 30))
    if rows * max(LENGTHS[i] for i in batch) > budget:
        with pytest.raises(ValueError, match="--micro-tokens"):
            schedule.micro_batches(batch, LENGTHS, rows, budget)
        return
    parts = schedule.micro_batches(batch, LENGTHS, rows, budget)
    assert sorted(i for p in parts for i in p) == batch
    assert all(rows * len(p) * max(LENGTHS[i] for i in p) <= budget for p in parts)
    assert len(parts) > 1


def test_micro_tokens_step_gives_the_same_gradient_as_one_micro_batch(tokenizer, monkeypatch):
    results, splits = [], []
    real_split = train.split_side
    monkeypatch.setattr(train, "split_side", lambda *a: (splits.append(real_split(*a)), splits[-1])[1])
    for flags in (("--micro-batch", "4"), ("--micro-tokens", "180")):
        model, teacher = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
        args = args_for("--loss", "dpo=1,npo=0.5,sft=1,kl=1,kl_rev=0.5", "--optimizer", "sgd", *flags)
        ctx = make_ctx(model, tokenizer)
        opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
        row = step_with(model, teacher, opt, schedule.Step(0, 0, [0, 1, 2, 3], []), ctx, args, 1.0, 1.0)
        results.append((row, [p.detach().clone() for p in model.parameters()]))
    assert len(splits[0]) == 1 and len(splits[1]) >= 3  # the budget did split the batch
    (a, wa), (b, wb) = results
    for k in ("loss", "harmful_dpo", "harmful_npo", "harmful_sft", "harmful_kl", "harmful_kl_rev"):
        assert a[k] == pytest.approx(b[k], rel=1e-4), k
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(wa, wb))
