"""Levels, the order of batches (epoch → level → batch), γ annealing and the learning rate.

A plan is a pure function of (pool sizes, flags, seed): a resumed run rebuilds the same plan and
continues at the saved step. Every shuffle draws from numpy's Generator seeded by
(seed, epoch, level, purpose), so changing one part of the plan leaves the others alone.

    python schedule.py --n-harmful 20 --n-harmless 12 --levels 2 --sequence cyclic

prints the plan without loading a model.
"""
import argparse
import math
from dataclasses import dataclass

import numpy as np

LOOPS = ("epoch-level", "level-epoch")
SEQUENCES = ("sequential", "cyclic", "mixed")
GAMMA_SCHEDULES = ("constant", "linear", "cosine", "exp", "step-per-level")
LR_SCHEDULES = ("constant", "linear", "cosine")
LEVELS_BY = ("random", "category", "difficulty")

# purposes, so that each kind of shuffle has its own random stream
_HARMFUL, _HARMLESS, _LEVEL_ORDER, _MIXED, _ASSIGN, _SPLIT = range(6)
_GROUP = 6


def _rng(seed, *keys):
    return np.random.default_rng([seed, *keys])


@dataclass
class Step:
    """One optimizer step: a harmful batch and the harmless examples trained with it, so that
    L = γ·L_harmful + λ·L_harmless is what one clip and one AdamW update see."""
    level: int       # level (0-based) of the harmful batch
    epoch: int
    harmful: list    # indices into the harmful training pool
    harmless: list   # indices into the harmless training pool


def assign_levels(n_examples, n_levels, by, seed=0, categories=None, difficulty=None):
    """Level (0-based) of every harmful training example.

    random: a seeded permutation cut into `n_levels` near-equal parts.
    category: one level per category, categories in sorted order (`n_levels` is then ignored).
    difficulty: ascending by `difficulty` (the initial student's per-token log-prob margin of the
    bad answer over the good one: small = already prefers the good answer = easy), cut into equal parts.
    """
    if n_levels < 1:
        raise ValueError(f"--levels must be ≥ 1, got {n_levels}")
    if by == "category":
        if categories is None or any(c is None for c in categories):
            raise ValueError("--levels-by category: the harmful data has no 'category' field")
        names = sorted(set(categories))
        return [names.index(c) for c in categories]
    if by == "random":
        order = _rng(seed, _ASSIGN).permutation(n_examples)
    elif by == "difficulty":
        if difficulty is None:
            raise ValueError("--levels-by difficulty needs the student's margins (computed by train.py)")
        order = np.argsort(np.asarray(difficulty, dtype=np.float64), kind="stable")
    else:
        raise ValueError(f"--levels-by must be one of {LEVELS_BY}, got {by!r}")
    levels = [0] * n_examples
    for part, chunk in enumerate(np.array_split(order, n_levels)):
        for i in chunk:
            levels[int(i)] = part
    return levels


def _batches(indices, batch_size):
    return [list(map(int, indices[i:i + batch_size])) for i in range(0, len(indices), batch_size)]


def length_grouped(indices, lengths, batch_size, bucket_batches, rng):
    """Batches of `indices` (already shuffled) with similar lengths: the indices are cut into buckets
    of `bucket_batches` batches, each bucket is sorted by length (stable: ties keep the shuffled
    order) and cut into batches, and the order of all batches is shuffled with `rng`. Bigger
    buckets pad less but change less between epochs; only the last bucket can end in a short batch."""
    size = batch_size * bucket_batches
    batches = []
    for i in range(0, len(indices), size):
        batches += _batches(sorted(indices[i:i + size], key=lambda j: lengths[j]), batch_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def _check_plan(epochs, batch_size, loop, sequence, level_order, benign_per_level, harmless_ratio, group_by_length,
                lengths):
    if loop not in LOOPS:
        raise ValueError(f"--loop must be one of {LOOPS}, got {loop!r}")
    if sequence not in SEQUENCES:
        raise ValueError(f"--sequence must be one of {SEQUENCES}, got {sequence!r}")
    if loop == "level-epoch" and sequence != "sequential":
        raise ValueError("--loop level-epoch trains one level at a time: use --sequence sequential")
    if level_order not in ("fixed", "shuffled"):
        raise ValueError(f"--level-order must be fixed or shuffled, got {level_order!r}")
    if benign_per_level not in ("full", "split"):
        raise ValueError(f"--benign-per-level must be full or split, got {benign_per_level!r}")
    if batch_size < 1 or epochs < 1 or harmless_ratio < 0:
        raise ValueError("--batch-size and --epochs must be ≥ 1 and --harmless-ratio ≥ 0")
    if group_by_length and lengths is None:
        raise ValueError("--group-by-length needs the tokenised examples' lengths (train.py computes them; "
                         "--plan-only and schedule.py alone cannot)")


def _harmless_batches(share, want, n_steps, key, group_by_length, lengths):
    """`want` harmless indices dealt over a level's n_steps steps (counts differ by ≤ 1): seeded
    permutations of the level's `share`, one after another until there are enough; with
    group_by_length G, sorted by length within each run of G steps. key = (seed, epoch, level)."""
    seed, epoch, level = key
    drawn, passes = [], 0
    while len(drawn) < want:
        drawn += [share[i] for i in _rng(seed, _HARMLESS, epoch, level, passes).permutation(len(share))]
        passes += 1
    drawn = drawn[:want]
    cuts = [want * k // n_steps for k in range(n_steps + 1)]
    if group_by_length:  # similar lengths within each run of G steps
        for a in range(0, n_steps, group_by_length):
            lo, hi = cuts[a], cuts[min(a + group_by_length, n_steps)]
            drawn[lo:hi] = sorted(drawn[lo:hi], key=lambda j: lengths[j])
    return [drawn[cuts[k]:cuts[k + 1]] for k in range(n_steps)]


def build_plan(levels, n_harmless, *, epochs=1, batch_size=8, loop="epoch-level", sequence="sequential",
               level_order="fixed", benign_per_level="full", harmless_ratio=1.0, seed=0,
               group_by_length=0, lengths=None):
    """The list of optimizer steps (see `Step`).

    Harmful side: each epoch, each level's examples are shuffled and cut into batches of
    `batch_size` (every harmful example exactly once per epoch).

    Harmless side, per level and epoch: the level's benign share is the whole harmless pool
    (`full`: every level goes through the entire benign set) or its own 1/L of a seeded split
    (`split`). The level takes max(|share|, ⌈harmless_ratio × its harmful count⌉) harmless examples:
    a fresh seeded permutation of the share, then further permutations while the ratio asks for
    more. They are spread over the level's steps as evenly as possible (counts differ by ≤ 1).

    sequence (epoch-level loop): sequential = level 1's steps, then level 2's, …; cyclic = one step
    from each level in turn until all are used; mixed = all levels' steps shuffled together. With
    loop=level-epoch each level runs all its epochs before the next (only `sequential` applies).

    group_by_length G > 0: harmful batches from `length_grouped` (buckets of G batches), harmless ones
    sorted by length within each run of G steps; `lengths` = (harmful, harmless lengths) in tokens.
    """
    _check_plan(epochs, batch_size, loop, sequence, level_order, benign_per_level, harmless_ratio, group_by_length,
                lengths)
    n_levels = max(levels) + 1 if levels else 0
    members = [[i for i, lv in enumerate(levels) if lv == level] for level in range(n_levels)]
    if benign_per_level == "full":
        shares = [list(range(n_harmless))] * n_levels
    else:
        perm = _rng(seed, _SPLIT).permutation(n_harmless)
        shares = [[int(i) for i in part] for part in np.array_split(perm, n_levels)]

    def steps_of(epoch, level):
        perm = _rng(seed, _HARMFUL, epoch, level).permutation(len(members[level]))
        shuffled = [members[level][i] for i in perm]
        harmful = length_grouped(shuffled, lengths[0], batch_size, group_by_length,
                                 _rng(seed, _GROUP, epoch, level)) if group_by_length else _batches(shuffled, batch_size)
        want = max(len(shares[level]), math.ceil(len(members[level]) * harmless_ratio - 1e-9)) if shares[level] else 0
        harmless = _harmless_batches(shares[level], want, len(harmful), (seed, epoch, level), group_by_length,
                                     lengths and lengths[1])
        return [Step(level, epoch, h, b) for h, b in zip(harmful, harmless)]

    def order_levels(epoch):
        if level_order == "shuffled":
            return [int(i) for i in _rng(seed, _LEVEL_ORDER, epoch).permutation(n_levels)]
        return list(range(n_levels))

    if loop == "level-epoch":
        return [s for level in order_levels(0) for epoch in range(epochs) for s in steps_of(epoch, level)]
    plan = []
    for epoch in range(epochs):
        per_level = [steps_of(epoch, level) for level in order_levels(epoch)]
        if sequence == "sequential":
            plan += [s for steps in per_level for s in steps]
        elif sequence == "cyclic":
            plan += [steps[i] for i in range(max(map(len, per_level), default=0)) for steps in per_level
                     if i < len(steps)]
        else:
            flat = [s for steps in per_level for s in steps]
            plan += [flat[i] for i in _rng(seed, _MIXED, epoch).permutation(len(flat))]
    return plan


def chunks(items, size):
    """Consecutive slices of at most `size` items: micro-batches by count."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def split_batch(indices, micro_batch, micro_tokens=0, lengths=None, rows=1, flag="--micro-tokens"):
    """A batch's micro-batches: `micro_batch` examples each, or, with a `micro_tokens` budget, at
    most that many padded tokens each (see micro_batches)."""
    if micro_tokens:
        return micro_batches(indices, lengths, rows, micro_tokens, flag)
    return chunks(list(indices), micro_batch)


def micro_batches(indices, lengths, rows, max_tokens, flag="--micro-tokens"):
    """A batch split into micro-batches of at most `max_tokens` padded tokens each (rows per example
    × examples × the longest example's length), longest examples first, filled greedily. The split
    does not change the loss: train.run_step weights each micro-batch by its share of the batch. An
    example over the budget is an error naming `flag`."""
    order = sorted(indices, key=lambda i: -lengths[i])  # stable
    out = []
    for i in order:
        if rows * lengths[i] > max_tokens:
            raise ValueError(f"{flag} {max_tokens}: an example needs {rows * lengths[i]} padded tokens "
                             f"({rows} rows of {lengths[i]}); raise the budget")
        if out and rows * (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(int(i))
        else:
            out.append([int(i)])
    return out


def gamma_at(step, total, schedule="constant", start=1.0, end=1.0, level=0, n_levels=1):
    """γ for optimizer step `step` (0-based) of `total`.

    linear: start → end; cosine: start → end along a half cosine; exp: start·(end/start)^(t) (both > 0);
    step-per-level: start + (end − start)·level/(L−1), constant within a level.
    """
    t = step / max(total - 1, 1)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "exp":
        if start <= 0 or end <= 0:
            raise ValueError("--gamma-schedule exp needs --gamma-start and --gamma-end > 0")
        return start * (end / start) ** t
    if schedule == "step-per-level":
        return start + (end - start) * level / max(n_levels - 1, 1)
    raise ValueError(f"--gamma-schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}")


def lr_at(step, total, lr, schedule="constant", warmup=0):
    """Learning rate for optimizer step `step` (0-based): linear warm-up over `warmup` steps
    (lr·(step+1)/warmup), then constant, or linear / cosine decay from lr towards 0 (reached one step
    after the last, so no step is wasted at lr 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1 - t)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def nonnegative(text):
    """argparse type: an int ≥ 0, so a bad count stops the run before any model is loaded."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def positive(text):
    """argparse type: an int ≥ 1 (a count whose 0 would silently mean 'all' or 'nothing')."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def add_arguments(parser):
    g = parser.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=10)   # 10 beat 2 in the ablation (docs/results.md)
    g.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    g.add_argument("--levels", type=int, default=5)
    g.add_argument("--levels-by", choices=LEVELS_BY, default="random")
    g.add_argument("--loop", choices=LOOPS, default="epoch-level")
    g.add_argument("--sequence", choices=SEQUENCES, default="sequential")
    g.add_argument("--level-order", choices=("fixed", "shuffled"), default="fixed")
    g.add_argument("--benign-per-level", choices=("full", "split"), default="split",
                   help="full: every level goes through the whole harmless pool; split: each level through its 1/L")
    g.add_argument("--harmless-ratio", type=float, default=2.0,
                   help="at least R harmless examples per harmful example in each step (a level also goes through "
                        "its whole benign share: see --benign-per-level)")
    g.add_argument("--gamma-schedule", choices=GAMMA_SCHEDULES, default="constant")
    g.add_argument("--gamma-start", type=float, default=1.0)
    g.add_argument("--gamma-end", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=3.0, help="λ: weight of the harmless-side loss terms")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine")
    g.add_argument("--warmup", type=int, default=2, help="warm-up optimizer steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--group-by-length", type=nonnegative, default=0, metavar="G",
                   help="batch examples of similar length: buckets of G batches are sorted by length, the "
                        "batch order is shuffled (0: off, batches are random)")


PLAN_FLAGS = ("epochs", "batch_size", "loop", "sequence", "level_order", "benign_per_level", "harmless_ratio",
              "seed", "group_by_length")


def plan_options(args):
    """The flags of add_arguments that build_plan reads, as its keyword arguments (for a script's main)."""
    return {k: getattr(args, k) for k in PLAN_FLAGS}


@dataclass(frozen=True)
class Scales:
    """γ(t), λ and lr(t) of every step, from the schedule flags."""
    gamma_schedule: str = "constant"
    gamma_start: float = 1.0
    gamma_end: float = 1.0
    lam: float = 1.0
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup: int = 0

    @classmethod
    def from_args(cls, args):
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})

    def gamma(self, t, total, level, n_levels):
        return gamma_at(t, total, self.gamma_schedule, self.gamma_start, self.gamma_end, level, n_levels)

    def lr_at(self, t, total):
        return lr_at(t, total, self.lr, self.lr_schedule, self.warmup)


def describe(plan, weights, n_levels):
    """One line per step: step, epoch, level, γ, λ, lr, harmful and harmless example indices."""
    lines = [f"{'step':>4} {'epoch':>5} {'level':>5} {'gamma':>7} {'lambda':>7} {'lr':>9}  harmful | harmless"]
    for t, s in enumerate(plan):
        g, lr = weights.gamma(t, len(plan), s.level, n_levels), weights.lr_at(t, len(plan))
        lines.append(f"{t:>4} {s.epoch:>5} {s.level + 1:>5} {g:>7.4f} {weights.lam:>7.4f} {lr:>9.2e}  "
                     f"{s.harmful} | {s.harmless}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print a training plan without loading a model.")
    parser.add_argument("--n-harmful", type=int, required=True)
    parser.add_argument("--n-harmless", type=int, required=True)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.levels_by != "random":
        parser.error("schedule.py alone knows only pool sizes: use --levels-by random "
                     "(train.py --plan-only handles category and difficulty)")
    levels = assign_levels(args.n_harmful, args.levels, "random", args.seed)
    plan = build_plan(levels, args.n_harmless, **plan_options(args))
    print(describe(plan, Scales.from_args(args), args.levels))


if __name__ == "__main__":
    main()
