import math

import pytest

import schedule
from schedule import build_plan, gamma_at, lr_at

LEVELS = [0, 0, 1, 1, 1]  # level 1 = examples {0, 1}, level 2 = {2, 3, 4}


def test_sequential_cyclic_and_level_epoch_orders():
    seq = build_plan(LEVELS, 0, epochs=2, batch_size=1, sequence="sequential", harmless_ratio=0)
    assert [s.level for s in seq] == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    cyc = build_plan(LEVELS, 0, epochs=1, batch_size=1, sequence="cyclic", harmless_ratio=0)
    assert [s.level for s in cyc] == [0, 1, 0, 1, 1]
    le = build_plan(LEVELS, 0, epochs=2, batch_size=1, loop="level-epoch", harmless_ratio=0)
    assert [(s.level, s.epoch) for s in le] == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 0), (1, 1),
                                                (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="level-epoch"):
        build_plan(LEVELS, 0, loop="level-epoch", sequence="cyclic")


def test_mixed_shuffles_steps_and_keeps_each_step_whole():
    plans = [build_plan(LEVELS, 4, epochs=1, batch_size=1, sequence="mixed", seed=s) for s in range(6)]
    for plan in plans:
        assert sorted(s.level for s in plan) == [0, 0, 1, 1, 1]
        assert all(len(s.harmful) == 1 and s.harmless for s in plan)  # each step holds both sides
    assert len({tuple(s.level for s in p) for p in plans}) > 1


def test_harmless_examples_per_step_follow_the_ratio():
    # full pool of 2 < ratio × harmful: the level takes ⌈r × its harmful count⌉, spread evenly
    plan = build_plan(LEVELS, 2, epochs=1, batch_size=1, sequence="sequential", harmless_ratio=2)
    assert [len(s.harmless) for s in plan] == [2, 2, 2, 2, 2]
    plan = build_plan(LEVELS, 1, epochs=1, batch_size=1, sequence="sequential", harmless_ratio=0.5)
    assert [len(s.harmless) for s in plan] == [0, 1, 0, 1, 1]  # level 1: ⌈1⌉ over 2 steps; level 2: ⌈1.5⌉ over 3
    plan = build_plan(LEVELS, 0, epochs=1, batch_size=1, harmless_ratio=2)
    assert all(s.harmless == [] for s in plan)


def test_every_harmful_example_once_per_epoch_and_batches_sized():
    levels = [i % 3 for i in range(23)]
    for seq in schedule.SEQUENCES:
        plan = build_plan(levels, 17, epochs=3, batch_size=4, sequence=seq, seed=5)
        for epoch in range(3):
            seen = [i for s in plan if s.epoch == epoch for i in s.harmful]
            assert sorted(seen) == list(range(23))
        for s in plan:
            assert 1 <= len(s.harmful) <= 4 and len(set(s.harmful)) == len(s.harmful)
            assert all(levels[i] == s.level for i in s.harmful)


def test_harmless_full_goes_through_the_whole_pool_at_every_level_and_split_through_a_share():
    levels = [i % 4 for i in range(40)]  # 4 levels of 10 harmful examples, batches of 5: 2 steps each
    full = build_plan(levels, 20, epochs=2, batch_size=5, benign_per_level="full", harmless_ratio=1, seed=1)
    for epoch in range(2):
        for level in range(4):
            steps = [s for s in full if s.epoch == epoch and s.level == level]
            # the whole pool (20 > ratio × 10) once per level, 10 per step
            assert sorted(i for s in steps for i in s.harmless) == list(range(20))
            assert [len(s.harmless) for s in steps] == [10, 10]
    split = build_plan(levels, 20, epochs=2, batch_size=5, benign_per_level="split", harmless_ratio=0, seed=1)
    shares = {}
    for s in split:
        shares.setdefault(s.level, []).extend(s.harmless)
    assert sorted(i for v in shares.values() for i in set(v)) == list(range(20))  # disjoint shares cover the pool
    assert all(sorted(v) == sorted(list(set(v)) * 2) and len(set(v)) == 5 for v in shares.values())  # 5 each, once an epoch
    # ratio 2 asks for 20 per level from a share of 5: four whole passes
    more = build_plan(levels, 20, epochs=1, batch_size=5, benign_per_level="split", harmless_ratio=2, seed=1)
    per_level = {}
    for s in more:
        per_level.setdefault(s.level, []).extend(s.harmless)
    assert all(len(v) == 20 and all(v.count(i) == 4 for i in set(v)) for v in per_level.values())


def test_seed_reproduces_and_changes_plan():
    levels = [i % 5 for i in range(50)]
    a = build_plan(levels, 30, epochs=2, batch_size=4, sequence="mixed", level_order="shuffled", seed=3)
    b = build_plan(levels, 30, epochs=2, batch_size=4, sequence="mixed", level_order="shuffled", seed=3)
    c = build_plan(levels, 30, epochs=2, batch_size=4, sequence="mixed", level_order="shuffled", seed=4)
    assert a == b
    assert a != c


def test_level_order_shuffled_is_a_permutation_per_epoch():
    levels = [i % 5 for i in range(5)]
    plan = build_plan(levels, 0, epochs=4, batch_size=1, level_order="shuffled", harmless_ratio=0, seed=0)
    orders = [[s.level for s in plan if s.epoch == e] for e in range(4)]
    assert all(sorted(o) == [0, 1, 2, 3, 4] for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_assign_levels():
    diff = [0.5, -1.0, 2.0, 0.0, 3.0, -2.0]
    assert schedule.assign_levels(6, 3, "difficulty", difficulty=diff) == [1, 0, 2, 1, 2, 0]
    assert schedule.assign_levels(3, 9, "category", categories=["b", "a", "b"]) == [1, 0, 1]
    lv = schedule.assign_levels(10, 3, "random", seed=0)
    assert sorted(lv.count(k) for k in range(3)) == [3, 3, 4]
    with pytest.raises(ValueError, match="category"):
        schedule.assign_levels(2, 2, "category", categories=[None, "x"])


def test_gamma_curves_at_ends_and_middle():
    assert gamma_at(0, 11, "constant", 0.7, 0.1) == 0.7
    assert [gamma_at(t, 11, "linear", 1, 0) for t in (0, 5, 10)] == [1, 0.5, 0]
    assert [round(gamma_at(t, 11, "cosine", 1, 0), 12) for t in (0, 5, 10)] == [1, 0.5, 0]
    assert math.isclose(gamma_at(5, 11, "exp", 1, 0.01), 0.1)
    assert math.isclose(gamma_at(10, 11, "exp", 1, 0.01), 0.01)
    assert [gamma_at(0, 9, "step-per-level", 1, 0, level=k, n_levels=5) for k in range(5)] == [1, .75, .5, .25, 0]
    with pytest.raises(ValueError):
        gamma_at(0, 2, "exp", 0, 1)


def test_lr_warmup_and_decay():
    assert [lr_at(t, 12, 1.0, "constant", warmup=2) for t in (0, 1, 2, 11)] == [0.5, 1, 1, 1]
    assert lr_at(7, 12, 1.0, "linear", warmup=2) == 0.5
    assert math.isclose(lr_at(7, 12, 1.0, "cosine", warmup=2), 0.5)
    assert lr_at(2, 12, 1.0, "cosine", warmup=2) == 1.0
    assert 0 < lr_at(11, 12, 1.0, "cosine", warmup=2) < 0.05


def test_plan_cli_prints_without_a_model(capsys):
    schedule.main(["--n-harmful", "6", "--n-harmless", "4", "--levels", "2", "--batch-size", "3", "--epochs", "1",
                   "--harmless-ratio", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["step", "epoch", "level", "gamma", "lambda"]
    assert len(out) == 1 + 2  # 2 levels of 3 harmful examples, one step each
    assert all(len(eval(l[l.index("["):].split(" | ")[1])) == 3 for l in out[1:])  # ratio 1: 3 harmless each
