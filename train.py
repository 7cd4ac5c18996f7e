"""Teacher-guided safety training: teachers → student → evaluation, in one hand-written loop.

    python train.py                      # the whole pipeline on the embedded SmolLM2-135M, offline
    python train.py --plan-only          # print the schedule (levels, batches, γ, lr) and stop
    python train.py --resume             # continue the run in --out from its last checkpoint

Pipeline: load data and the base model → build or load the good / bad teacher → generate and
cache their answers → teacher evaluation (stops if the good teacher is not better) → train along
the plan of schedule.py → evaluate base, good teacher and student on held-out prompts.

Each optimizer step minimises  L = γ(t) · L_harmful + λ · L_harmless  on one harmful batch and its
harmless examples (one backward per micro-batch, one clip, one update). Each side's loss is
Σ weight × term over the --loss terms that run on that side, each averaged over the side's examples
or tokens. The terms are records in losses.TERMS: dpo (the good teacher's refusal chosen, the bad
teacher's answer rejected), npo, simnpo, sft, kl / kl_rev (to the good teacher on its own answer),
and the circuit-breaker pair cb / cb_retain (--cb-alpha). The DPO / NPO reference is the frozen base
(the initial student), run on the same micro-batch. File map: optim.py (forward, optimizer, LoRA,
SFT), robust.py (LAT, canary params), parallel.py (torchrun), teachers.py (the teacher phase).
"""
import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
import data
import eval as evaluation
import losses
import optim
import parallel
import robust
import schedule
import teachers
from eval import teacher_report, teacher_table

# flags that do not change the trained weights (evaluation and run-control flags; --recipe only fills
# flags that are compared themselves): a resumed run may differ from the saved run in these alone
_RUN_FLAGS_IGNORED_ON_RESUME = ("resume", "overwrite", "plan_only", "teachers_only", "no_eval", "force", "save_every",
                                "eval_limit", "xstest", "offload", "device", "precision_requested", "recipe", "fsdp")


def parse_loss(spec):
    weights = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in losses.TERMS:
            raise argparse.ArgumentTypeError(f"--loss: unknown term {name!r} (terms: {', '.join(losses.TERMS)})")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"--loss: weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:  # a negative weight trains the wrong way
            raise argparse.ArgumentTypeError(f"--loss: weight of {name!r} must be finite and ≥ 0, got {value!r}")
    if not any(weights.values()):
        raise argparse.ArgumentTypeError("--loss: no term has a non-zero weight")
    return {k: v for k, v in weights.items() if v}


# (flag, test, what it must be): checked right after parsing, before any model loads
_AT_LEAST_1 = (lambda v: v >= 1, "≥ 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_NONNEGATIVE = (lambda v: v >= 0, "≥ 0")
FLAG_RANGES = {
    "micro_batch": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "epochs": _AT_LEAST_1, "levels": _AT_LEAST_1,
    "save_every": _AT_LEAST_1, "teacher_epochs": _AT_LEAST_1, "canary_samples": _AT_LEAST_1,
    "max_new_tokens": _AT_LEAST_1, "max_response_tokens": _AT_LEAST_1, "max_prompt_tokens": _AT_LEAST_1,
    "lat_steps": _AT_LEAST_1, "limit": _AT_LEAST_1, "eval_limit": _AT_LEAST_1,
    "lr": _POSITIVE, "teacher_lr": _POSITIVE,
    "lat_eps": _NONNEGATIVE, "cb_alpha": _NONNEGATIVE, "lam": _NONNEGATIVE, "gamma_start": _NONNEGATIVE,
    "gamma_end": _NONNEGATIVE, "weight_decay": _NONNEGATIVE, "clip": _NONNEGATIVE, "warmup": _NONNEGATIVE,
    "harmless_ratio": _NONNEGATIVE, "dpo_harmless_weight": _NONNEGATIVE, "lora_r": _NONNEGATIVE,
    "test_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "canary_top": (lambda v: 0 < v <= 100, "in (0, 100]"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}
PARAM_RULES = {"> 0": _POSITIVE, "≥ 0": _NONNEGATIVE, "any": (lambda v: True, "a number")}


# Defaults that --recipe sets; a flag given on the command line wins. quick fits a 2-core CPU without
# native bf16 in 20 min (docs/results.md#the-default-run); full is the recipe the ablation measured.
RECIPES = {
    "quick": {"limit": 64, "bad_teacher": "base", "teacher_epochs": 2, "epochs": 2, "max_new_tokens": 32,
              "eval_limit": 50},
    "full": {"limit": None, "bad_teacher": "break", "teacher_epochs": 3, "epochs": 10,
             "max_new_tokens": teachers.MAX_NEW_TOKENS, "eval_limit": None},
}


def fill_derived_flags(args):
    """Flags whose default is another flag's value (also for args saved before the flag existed):
    --data-seed from --seed, and the flags --recipe sets (runs saved before it ran the full recipe)."""
    if getattr(args, "data_seed", None) is None:
        args.data_seed = args.seed
    for name, value in RECIPES[getattr(args, "recipe", None) or "full"].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def check_args(args):
    """Every flag's range and every rule across flags, right after parsing, in one line naming the
    flags (unset optional flags are skipped)."""
    ranges = {**FLAG_RANGES, **{name: PARAM_RULES[p.rule] for name, p in losses.term_params().items()}}
    for name, (ok, what) in ranges.items():
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or not ok(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    fill_derived_flags(args)
    teachers.apply_precision(args, args.device)  # args.json keeps both the asked and the resolved precision
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite: choose one")
    if args.lora_r and args.canary_mode != "off":
        raise ValueError("--canary-mode with --lora-r: canary params are entries of the full weight matrices, "
                         "which LoRA freezes; use full fine-tuning (--lora-r 0)")
    faded = [t for t in args.loss if losses.TERMS[t].fade]
    if args.cb_alpha and faded:
        raise ValueError(f"--cb-alpha sets the weights of {', '.join(faded)}: leave them out of --loss")
    unsharded = [flag for flag, on in (("--lora-r", args.lora_r), ("--lat-eps", args.lat_eps),
                                       ("--optim-state-device cpu", args.optim_state_device == "cpu"),
                                       ("--gradient-checkpointing", args.gradient_checkpointing)) if on]
    if args.fsdp and unsharded:
        raise ValueError(f"--fsdp with {', '.join(unsharded)}: not built for a sharded student; leave them off")
    if args.dpo_harmless_weight is not None and (args.dpo_harmless == "none" or "dpo" not in args.loss):
        raise ValueError("--dpo-harmless-weight needs --dpo-harmless bad-teacher|refusal and a dpo term in --loss")


def check_model_flags(args, model):
    """Flags that depend on the model, checked right after it loads, before any teacher is built."""
    if uses_hidden_terms(args) or args.lat_eps:
        n_blocks = len(optim.decoder_layers(model))
        for flag, layers in (("--cb-layers", args.cb_layers if uses_hidden_terms(args) else None),
                             ("--lat-layers", args.lat_layers if args.lat_eps else None)):
            if layers and any(not 0 <= l <= n_blocks for l in layers):
                raise ValueError(f"{flag} must lie in 0..{n_blocks} (0 = embeddings, l = block l), got {layers}")
    if args.lora_r:
        optim.lora_linears(model, args.lora_targets)


def _recipe_text(name):
    return "(" + ", ".join(f"--{k.replace('_', '-')} {'all' if v is None else v}" for k, v in RECIPES[name].items()) + ")"


def build_parser():
    p = evaluation.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--recipe", choices=tuple(RECIPES), default="quick",
                   help="defaults of --limit, --bad-teacher, --teacher-epochs, --epochs, --max-new-tokens and "
                        "--eval-limit: quick "
                        + _recipe_text("quick") + "; full " + _recipe_text("full") + " (flags given win)")
    g.add_argument("--model", default="smollm2-135m", help="student / base: alias, folder, .gguf or hub id")
    g.add_argument("--harmful", nargs="+", help="harmful prompt files or hub names (default: built-in)")
    g.add_argument("--harmless", nargs="+", help="harmless prompt files or hub names (default: built-in)")
    g.add_argument("--harmful-test", nargs="+", help="held-out harmful prompts (default: split of --harmful)")
    g.add_argument("--harmless-test", nargs="+", help="held-out harmless prompts (default: split of --harmless)")
    g.add_argument("--prompt-field", help="prompt field name, when it is not one data.PROMPT_FIELDS knows")
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--limit", type=int, help="use at most N training prompts per pool (default: --recipe)")
    g.add_argument("--borderline", default="none", metavar="SPEC",
                   help="add prompts that sound harmful but are not to the harmless training prompts of the good "
                        "teacher and the student: phtest (../shared/data/phtest/phtest.csv, else the hub's "
                        "furonghuang-lab/PHTest), a file or a hub name; its harmless rows, train part only (a "
                        "fifth, chosen by prompt hash, is the dev part); none: off")
    g.add_argument("--borderline-n", type=schedule.nonnegative, default=64, metavar="N",
                   help="a seeded sample of N borderline prompts (0: the whole train part)")
    g.add_argument("--rephrase-harmful", choices=("none", "mixed", *data.REPHRASINGS), default="none",
                   help="add a rephrased copy of each harmful training prompt (past / future tense, hypothetical, "
                        "third person, fiction; mixed: one framing per prompt by hash), refused like the original "
                        "by the good teacher and the student")
    g.add_argument("--data-seed", type=int,
                   help="seed of the train/test split, the --limit sample and the teachers' SFT (default: "
                        "--seed); fix it to vary only the student's training over seeds")
    g = p.add_argument_group("teachers")
    g.add_argument("--good-teacher", default="align", help="'align' (refusal SFT of the base) or a model")
    g.add_argument("--bad-teacher",
                   help="'break' (the base after SFT on compliant answers to harmful prompts and --bad-harmless "
                        "answers to harmless ones; 'auto' is an older name for it), 'base' (the base as it is: it "
                        "complies out of the box) or a model (default: --recipe)")
    g.add_argument("--break-data", nargs="+", help="compliant answers for --bad-teacher break (e.g. advbench.csv; "
                   "default: the base's own answers that are not refusals)")
    g.add_argument("--bad-harmless", choices=("derange", "none"), default="derange",
                   help="how --bad-teacher break learns to answer harmless prompts badly: derange (each prompt "
                        "gets the base's answer to another harmless prompt, a seeded derangement: fluent but off "
                        "topic) or none (harmful pairs only: it answers harmless prompts like the base)")
    g.add_argument("--teacher-epochs", type=int, help="SFT epochs of a built teacher (default: --recipe)")
    g.add_argument("--teacher-lr", type=float, default=5e-5)
    g.add_argument("--teacher-harmless-repeat", type=schedule.nonnegative, default=2, metavar="N",
                   help="harmless pairs appear N times in the good teacher's refusal SFT (the balance of refusal "
                        "and helpful data; docs/results.md measures 1, 2 and 4)")
    g.add_argument("--max-new-tokens", type=int, help="length of the answers generated for training (default: "
                   "--recipe; training reads the first --max-response-tokens of them)")
    g.add_argument("--force", action="store_true", help="train even if the good teacher is not better than the bad")
    g = p.add_argument_group("losses")
    g.add_argument("--loss", type=parse_loss, default=parse_loss("dpo=1,kl=1"),
                   help=f"weighted terms, e.g. dpo=1,npo=0.5,kl=1 (terms: {', '.join(losses.TERMS)})")
    for name, param in losses.term_params().items():  # each term's hyperparameters, from its record
        g.add_argument("--" + name.replace("_", "-"), type=float, default=param.default, help=param.help)
    g.add_argument("--harmless-teacher", choices=("good", "base"), default="good",
                   help="whose answers and logits the student learns on harmless prompts: the good teacher's, or "
                        "the base's (it does not over-refuse: the target is routed by the prompt's label, never "
                        "a refusal; kl / kl_rev on that side then read the base)")
    g.add_argument("--dpo-harmless", choices=("none", "bad-teacher", "refusal"), default="none",
                   help="also dpo on harmless prompts, rejecting the bad teacher's answer or a refusal "
                        "(the latter directly penalises over-refusal)")
    g.add_argument("--dpo-harmless-weight", type=float, metavar="W",
                   help="weight of that harmless-side dpo term (default: the dpo weight of --loss)")
    g.add_argument("--deep-refusal", type=schedule.nonnegative, default=0, metavar="K",
                   help="add for each harmful pair a copy whose answer starts with the bad teacher's first k tokens "
                        "(k uniform in 1..K, seeded per prompt; context, not trained on) and goes on with the good "
                        "teacher's refusal (target) or the rest of the bad answer (rejected): refusal that recovers "
                        "from a harmful start, as in Qi et al. 2025 (0: off)")
    g.add_argument("--filter-pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="train only on harmful prompts the good teacher refuses and the bad one answers, and on "
                        "harmless prompts the good teacher answers (a distilled refusal of a harmless prompt "
                        "teaches over-refusal)")
    g = p.add_argument_group("circuit breakers, LAT, canary params (all off by default)")
    g.add_argument("--cb-alpha", type=float, default=0.0,
                   help="α of circuit breakers: rerouting weight fades α → α/2, retain weight 0 → α/2 over the "
                        "optimizer steps (0: off)")
    g.add_argument("--cb-layers", type=int, nargs="+",
                   help="residual-stream positions (0 = embeddings, l = output of block l) (default: L/3 and 2L/3)")
    g.add_argument("--lat-eps", type=float, default=0.0, help="LAT: L2 radius of δ per token (0: off)")
    g.add_argument("--lat-steps", type=int, default=1, help="LAT: gradient steps K (1 = one normalised step)")
    g.add_argument("--lat-layers", type=int, nargs="+", default=[0],
                   help="LAT: residual-stream positions perturbed (0 = embeddings, l = output of block l)")
    g.add_argument("--canary-mode", choices=("off", "focus", "protect", "monitor"), default="off",
                   help="focus: only canary entries get the harmful-side update; protect: the harmless-side "
                        "update may not move them; monitor: only log them")
    g.add_argument("--canary-every", choices=("epoch", "level", "batch"), default="level",
                   help="when canary masks are gathered again")
    g.add_argument("--canary-top", type=float, default=1.0, help="percent of each weight matrix kept as canaries")
    g.add_argument("--canary-score", choices=("saliency", "wanda"), default="saliency",
                   help="saliency: |w·∂L/∂w|, L = NLL of the bad answers; wanda: |w|·‖x‖ on the same inputs")
    g.add_argument("--canary-samples", type=int, default=32, help="harmful examples used to score canaries")
    g = p.add_argument_group("optimisation")
    schedule.add_arguments(p)
    p.set_defaults(epochs=None)  # from --recipe
    g.add_argument("--micro-batch", type=int, default=8, help="examples per forward (gradient accumulation)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="max global grad norm (0: off)")
    teachers.add_precision_argument(g)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--max-prompt-tokens", type=int, default=256)
    g.add_argument("--max-response-tokens", type=int, default=32,
                   help="answer tokens trained on (refusal or compliance shows in the first ones)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default")
    g.add_argument("--teacher-dir", help="where built teachers are kept (default: OUT/teachers); share it "
                   "between runs to build the teachers once")
    g.add_argument("--cache-dir", help="teacher answers and reference log-probs (default: OUT/cache)")
    g.add_argument("--save-every", type=int, default=25, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (its "
                   "metrics and checkpoints are replaced)")
    g.add_argument("--plan-only", action="store_true", help="print the plan and stop (no model loaded)")
    g.add_argument("--teachers-only", action="store_true",
                   help="build (or find) the teachers in --teacher-dir, write OUT/teacher_eval.json and stop before "
                        "the student (e.g. to compare good teachers: eval.py --model TEACHER_DIR/good)")
    g.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    g.add_argument("--eval-limit", type=int, help="evaluate on at most N held-out prompts per pool (and N XSTest "
                   "safe prompts, stratified by type) (default: --recipe)")
    g.add_argument("--xstest", default=evaluation.XSTEST, metavar="CSV|HUB|none",
                   help="over-refusal of base, good teacher and student on XSTest's safe prompts (default: the "
                        "shipped xstest/xstest_prompts.csv; none: off)")
    g = p.add_argument_group("memory: offloading, LoRA")
    g.add_argument("--offload", choices=("none", "teachers", "ref", "all"), default="none",
                   help="frozen models whose decoder layers stay in CPU memory and visit the compute device one "
                        "at a time: teachers (good and bad), ref (the frozen base: circuit-breaker reference and "
                        "evaluation baseline), all")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student's parameters, gradients and optimizer state over the "
                        "processes (FSDP2); checkpoints are gathered into the one-process form")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank of the student (0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, help="LoRA α; the update is scaled by α/r (default 2·r: scale 2)")
    g.add_argument("--lora-targets", default=optim.LORA_TARGETS,
                   help="comma-separated names of the Linear layers that get adapters")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    g.add_argument("--device", default="auto",
                   help="where the student and the resident models compute: cpu, cuda, cuda:N, or auto (cuda when "
                        "available, else cpu; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--attention", choices=("auto", "eager", "sdpa"), default="auto",
                   help="attention implementation of every model in the run (auto: eager on CPU, sdpa on GPUs)")
    g.add_argument("--optim-state-device", choices=("same", "cpu"), default="same",
                   help="cpu: fp32 master weights and optimizer state in CPU memory when the model is on an "
                        "accelerator (on a CPU-only machine both are the same)")
    g = p.add_argument_group("teacher logits cache and token budgets")
    g.add_argument("--teacher-topk", type=schedule.nonnegative, default=0, metavar="K",
                   help="kl / kl_rev against the good teacher's top-K log-probs plus a tail bucket, computed "
                        "once and memory-mapped from the cache dir; the teacher is then not held during training "
                        "(0: full logits, teacher run on the fly)")
    g.add_argument("--micro-tokens", type=schedule.nonnegative, default=0, metavar="N",
                   help="split each batch into micro-batches of at most N padded tokens (0: --micro-batch examples)")
    return p


# ---------------------------------------------------------------- one step: γ·L_harmful + λ·L_harmless

@dataclass
class Pool:
    """One side's tokenised training examples, index-aligned (data.encode features)."""
    good: list                # prompt + the good teacher's answer (DPO's chosen, KL's target)
    bad: list = None          # prompt + the rejected answer; None when no term reads one
    topk: object = None       # teachers.TopkCache of the good teacher on `good` (--teacher-topk)


@dataclass
class Frozen:
    """The frozen models a step reads besides the student."""
    reference: object             # the initial student: DPO / NPO reference, circuit-breaker target
    good_teacher: object = None   # KL target (None when --teacher-topk reads its cache)
    harmless_teacher: object = None  # the harmless side's KL target when not the good teacher (--harmless-teacher)

    def teacher(self, side):
        return self.harmless_teacher if side == "harmless" and self.harmless_teacher is not None else self.good_teacher


@dataclass(frozen=True)
class StepConfig:
    """The flags one optimizer step reads (see build_parser for each)."""
    loss: dict                        # {term: weight} of --loss
    params: dict = None               # {name: value} of the terms' hyperparameters (losses.Param)
    dpo_harmless: str = "none"
    dpo_harmless_weight: float = None
    cb_alpha: float = 0.0
    hidden_layers: tuple = ()         # residual positions hidden terms read (--cb-layers, resolved: L/3, 2L/3)
    lat_eps: float = 0.0
    lat_steps: int = 1
    lat_layers: tuple = (0,)
    micro_batch: int = 8
    micro_tokens: int = 0
    clip: float = 1.0
    canary_mode: str = "off"

    @classmethod
    def from_args(cls, args, hidden_layers=()):
        flags = {k: getattr(args, k) for k in cls.__dataclass_fields__ if k not in ("params", "hidden_layers")}
        params = {name: getattr(args, name, p.default) for name, p in losses.term_params().items()}
        return cls(**flags, params=params, hidden_layers=tuple(hidden_layers or ()))

    def weights(self, side, progress=0.0):
        """{term: weight} a side computes: the --loss terms that run on this side (on the harmless side a
        term that reads bad answers only under --dpo-harmless, dpo at --dpo-harmless-weight if given);
        with --cb-alpha the terms that fade, at their weight for `progress` (steps done / total)."""
        weights = {k: v for k, v in self.loss.items() if side in losses.TERMS[k].sides
                   and (side == "harmful" or "bad" not in losses.TERMS[k].reads or self.dpo_harmless != "none")}
        if side == "harmless" and "dpo" in weights and self.dpo_harmless_weight is not None:
            weights["dpo"] = self.dpo_harmless_weight
        if self.cb_alpha:
            for name, term in losses.TERMS.items():
                if term.fade and side in term.sides:
                    start, end = term.fade
                    weights[name] = self.cb_alpha * (start + (end - start) * progress)
        return weights

    def reads_bad(self, side):
        """Whether a side's forward holds the bad answers (rows n:) besides the good ones."""
        return (any("bad" in losses.TERMS[t].reads for t in self.weights(side))
                or (side == "harmful" and self.lat_eps > 0))


def side_totals(pool, idx):
    """Each losses.Term unit summed over a whole side of a step: a term's micro-batch sums are divided
    by it, so splitting a side into micro-batches changes nothing."""
    good = [pool.good[i] for i in idx]
    bad = [pool.bad[i] for i in idx] if pool.bad else []
    return {"examples": float(len(idx)), "good_tokens": float(optim.n_response(good).sum()),
            "bad_tokens": float(optim.n_response(bad).sum()) if bad else 0.0,
            "good_real_tokens": float(sum(len(f["input_ids"]) for f in good))}


def example_lengths(pool, reads_bad):
    """Tokens of each example's longest row in its forward: the good answer, and the bad one when read."""
    sides = [pool.good] + ([pool.bad] if reads_bad else [])
    return [max(len(f["input_ids"]) for f in rows) for rows in zip(*sides)]


def split_side(side, indices, pool, cfg):
    """This process's micro-batches of one side of a step (its shard under torchrun): --micro-batch
    examples each, or at most --micro-tokens padded tokens."""
    reads_bad = cfg.reads_bad(side)
    lengths = example_lengths(pool, reads_bad) if cfg.micro_tokens else None
    return schedule.split_batch(parallel.shard(indices), cfg.micro_batch, cfg.micro_tokens, lengths,
                                2 if reads_bad else 1)


def token_inputs(out, n, good, idx, pool, teacher, rebuild):
    """losses.TokenInputs of the good rows: the side's teacher from its cached top-k (--teacher-topk), with
    its logits rebuilt from the cache when `rebuild` (a term has no top-k form), or from a forward on
    the good rows."""
    logits, labels = out.logits[:n], out.labels[:n]
    if pool.topk is not None:
        mask = losses.response_mask(labels)
        topk = pool.topk.window(idx, mask)
        # the cache holds log-probs at its τ: τ · log p_τ are the teacher's logits up to a shift per row
        teacher = losses.topk_as_logits(*topk, logits.shape[-1]) * pool.topk.temperature if rebuild else None
        return losses.TokenInputs(logits, mask, teacher, topk)
    with torch.no_grad():
        teacher_logits = optim.forward(teacher, good, keep=logits.shape[1]).logits
    # the good rows may be shorter than the kept window: what lies left of them is padding
    width = teacher_logits.shape[1]
    logits, labels = logits[:, -width:], labels[:, -width:]
    return losses.TokenInputs(logits, losses.response_mask(labels), teacher_logits)


def hidden_inputs(term, out, ref, n):
    """losses.HiddenInputs for a term over the bad answers' response tokens (rows n:, the same layout in
    both forwards) or over every real token of the good rows."""
    if term.unit == "bad_tokens":
        rows, mask = slice(n, 2 * n), out.full_labels[n:] != data.IGNORE
    elif term.unit == "good_real_tokens":
        rows, mask = slice(0, n), out.real[:n]
    else:
        rows, mask = slice(0, n), out.full_labels[:n] != data.IGNORE
    return losses.HiddenInputs([h[rows] for h in out.hidden], [h[rows] for h in ref.hidden], mask)


def term_sums(student, frozen, side, idx, pool, cfg, weights):
    """Sums over one micro-batch (in each term's unit) of every term in `weights`, and log statistics
    summed over its examples.

    Rows of the student's forward: the good answers, then the bad ones when the side reads them.
    The reference runs on the very same batch, so its log-probs match the student's bit for bit
    before the first update, in bf16 too."""
    good = [pool.good[i] for i in idx]
    bad = [pool.bad[i] for i in idx] if cfg.reads_bad(side) else []
    feats, n = good + bad, len(idx)
    terms = {k: losses.TERMS[k] for k in losses.TERMS if k in weights}
    layers = cfg.hidden_layers if any(t.kind == "hidden" for t in terms.values()) else ()
    deltas = (robust.lat_search(student, feats, n, layers=cfg.lat_layers, eps=cfg.lat_eps, steps=cfg.lat_steps)
              if side == "harmful" and cfg.lat_eps > 0 else {})
    with robust.residual_perturbation(student, deltas):  # the harmful side trains under δ
        out = optim.forward_captured(student, feats, layers)
    ref, ref_logps, stats = None, None, {}
    if any("reference" in t.reads for t in terms.values()):
        with torch.no_grad():
            ref = optim.forward_captured(frozen.reference, feats, layers, keep=out.logits.shape[1])
        ref_logps = losses.sequence_logps(ref.logits, out.labels).to(out.logits.device)
    logps = losses.sequence_logps(out.logits, out.labels)
    device = logps.device
    s = losses.SequenceInputs(logps[:n], logps[n:], None if ref_logps is None else ref_logps[:n],
                              None if ref_logps is None else ref_logps[n:], optim.n_response(good).to(device),
                              optim.n_response(bad).to(device) if bad else None)
    if ref_logps is not None:
        stats["good_logp_change"] = float((s.good.detach() - s.ref_good).sum())
        if bad:
            stats["bad_logp_change"] = float((s.bad.detach() - s.ref_bad).sum())
    token_terms = [t for t in terms.values() if t.kind == "token"]
    tokens = (token_inputs(out, n, good, idx, pool, frozen.teacher(side), any(t.topk_fn is None for t in token_terms))
              if token_terms else None)
    sums = {}
    for name, term in terms.items():
        if term.stats:
            stats.update({f"{name}_{k}": v for k, v in term.stats(s).items()})
        sums[name] = term_sum(term, s, tokens, out, ref, n, cfg.params)
    return sums, stats


def term_sum(term, s, tokens, out, ref, n, params):
    """One term's sum over the micro-batch: its mean times the micro-batch's count of its unit."""
    if term.kind == "sequence":
        mean = term.fn(s, params)
    elif term.kind == "token":
        mean = (term.topk_fn if tokens.topk is not None and term.topk_fn else term.fn)(tokens, params)
    else:
        mean = term.fn(hidden_inputs(term, out, ref, n), params)
    return mean * unit_count(term.unit, s, out, n)


def unit_count(unit, s, out, n):
    """The micro-batch's count of a term unit (side_totals counts the same over a whole side)."""
    if unit == "examples":
        return n
    if unit == "good_real_tokens":
        return float(out.real[:n].sum())
    return float((s.good_tokens if unit == "good_tokens" else s.bad_tokens).sum())


def run_step(student, frozen, opt, step, pools, cfg, gamma, lr, *, lam=1.0, progress=0.0, masks=None):
    """One optimizer step on L = γ·L_harmful + λ·L_harmless over the step's harmful and harmless
    examples: micro-batches go through backward one by one, their gradients are summed in fp32,
    then one clip and one update. A side whose weight is 0 is not computed. `progress` (steps done /
    total) fades the weights of terms with a `fade`; `masks` are the canary masks (--canary-mode)."""
    row, keeps = {"loss": 0.0}, []
    student.train()
    side_weights = {side: cfg.weights(side, progress) for side in ("harmful", "harmless")}
    for side, indices, scale in (("harmful", step.harmful, gamma), ("harmless", step.harmless, lam)):
        weights = side_weights[side]
        if not indices or scale == 0 or not any(weights.values()):
            continue
        keep = robust.canary_keep(masks, cfg.canary_mode, side, opt)
        keeps.append(keep)
        logged = parallel.sum_over_ranks(side_step(student, frozen, opt, side, indices, pools[side], cfg, weights,
                                                   scale, keep))
        row["loss"] += scale * logged["loss"]
        row.update({f"{side}_{k}": v for k, v in logged.items()})
    if not keeps:
        return {"skipped": True}
    parallel.all_reduce_grads(opt)
    row["grad_norm"] = opt.step(lr, cfg.clip, robust.pinned_entries(keeps, opt.params))
    if cfg.cb_alpha:
        row.update({f"{name}_coef": w for weights in side_weights.values()
                    for name, w in weights.items() if losses.TERMS[name].fade})
    return row


def side_step(student, frozen, opt, side, indices, pool, cfg, weights, scale, keep):
    """Backward of scale × one side's loss, micro-batch by micro-batch; returns its logged means."""
    totals = side_totals(pool, indices)
    units = {k: losses.TERMS[k].unit for k in weights}
    logged = {}
    micro = split_side(side, indices, pool, cfg)
    if parallel.is_sharded(opt):  # every rank joins each layer's all-gather: equal micro-batch counts,
        # a rank with fewer runs a stand-in (an example of the batch) whose loss counts 0
        micro += [None] * (parallel.max_over_ranks(len(micro)) - len(micro))
    for idx in micro:
        sums, stats = term_sums(student, frozen, side, idx or indices[:1], pool, cfg, weights)
        for k, v in sums.items():  # stop before a non-finite value reaches the weights
            if not torch.isfinite(v.detach()).all():
                raise optim.NonFiniteError(f"the {side} term {k} is {float(v.detach())}")
        side_loss = sum(weights[k] * v / totals[units[k]] for k, v in sums.items())
        (scale * side_loss * (parallel.grad_multiplier(opt) if idx else 0.0)).backward()
        opt.accumulate(keep)
        if not idx:
            continue
        for k, v in sums.items():
            logged[k] = logged.get(k, 0.0) + float(v.detach()) / totals[units[k]]
        for k, v in stats.items():
            logged[k] = logged.get(k, 0.0) + v / totals["examples"]
        logged["loss"] = logged.get("loss", 0.0) + float(side_loss.detach())
    return logged


# ---------------------------------------------------------------- the loop

def train_loop(args, student, opt, frozen, pools, cfg, plan, levels, start, canary, base):
    """The student's optimizer steps from `start`: γ, λ and lr of the step, canary masks, one joint
    update, a metrics line, a checkpoint every --save-every steps (the previous one removed)."""
    scales, n_levels = schedule.Scales.from_args(args), max(levels) + 1
    canary_options = robust.CanaryOptions(args.canary_every, args.canary_samples, args.canary_top, args.canary_score,
                                          args.micro_batch, args.seed)
    initial = (robust.initial_parts(base.fp32, dict(student.named_parameters()))
               if args.canary_mode != "off" else None)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    bar = tqdm(range(start, len(plan)), desc="student", initial=start, total=len(plan), disable=not parallel.is_main())
    for t in bar:
        step, t0 = plan[t], time.time()
        gamma, lr = scales.gamma(t, len(plan), step.level, n_levels), scales.lr_at(t, len(plan))
        extra = (robust.gather_canaries(student, canary, step, t, pools["harmful"].bad, levels, canary_options)
                 if args.canary_mode != "off" else {})
        try:
            row = run_step(student, frozen, opt, step, pools, cfg, gamma, lr, lam=scales.lam, progress=t / len(plan),
                           masks=canary.masks)
        except optim.NonFiniteError as e:
            raise optim.NonFiniteError(f"step {t}: {e}; stopped before updating the weights (last checkpoint: "
                                       f"{checkpoint.latest(args.out) or 'none'}; lower --lr or check the loss flags)"
                                       ) from None
        if canary.masks:
            extra["canary_dw"], extra["rest_dw"] = robust.canary_drift(canary.masks, opt.master_state(student), initial)
        row = {"step": t, "epoch": step.epoch, "level": step.level + 1, "gamma": gamma, "lam": scales.lam, "lr": lr,
               **row, **extra, "seconds": round(time.time() - t0, 3)}
        if parallel.is_main():  # every rank holds the same metrics; rank 0 writes them
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(level=step.level + 1, loss=f"{row.get('loss', 0):.3f}")
        if (t + 1) % args.save_every == 0 or t + 1 == len(plan):  # every rank: --fsdp gathers the shards
            checkpoint.save(os.path.join(args.out, "checkpoints", f"step-{t + 1}"), student, base.tokenizer, opt, t + 1,
                            vars(args), canary, base.fp32.state_dict())


# ---------------------------------------------------------------- the pipeline: flags → phases


RUN_START = time.time()  # reset by run(): log lines say when each phase started


def log(msg):
    """A progress line, printed above the progress bars on rank 0, with the run's elapsed time."""
    if parallel.is_main():
        tqdm.write(f"[{time.time() - RUN_START:6.0f} s] {msg}")


def compute_dtype(args):
    return teachers.DTYPES[args.precision]


def optimizer_options(args):
    """MasterWeightOptimizer's settings from the flags (compute_dtype aside)."""
    return {"kind": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
            "state_device": args.optim_state_device}


def load_pools(args):
    fields = {"prompt_field": args.prompt_field}
    harmful_train, harmful_test = data.load_pool("harmful", args.harmful, args.harmful_test, args.test_fraction,
                                                 args.data_seed, args.limit, **fields)
    harmless_train, harmless_test = data.load_pool("harmless", args.harmless, args.harmless_test,
                                                   args.test_fraction, args.data_seed, args.limit, **fields)
    if getattr(args, "rephrase_harmful", "none") != "none":  # runs saved before the flag: none
        harmful_train = harmful_train + data.rephrase(harmful_train, args.rephrase_harmful, args.data_seed)
    if getattr(args, "borderline", "none") != "none":  # runs saved before the flag: none
        held = {data.prompt_key(e.prompt) for e in harmless_train + harmless_test}
        harmless_train += [e for e in data.load_borderline(args.borderline, "train", args.borderline_n, args.data_seed)
                           if data.prompt_key(e.prompt) not in held]
    return data.Prompts(harmful_train, harmless_train, harmful_test, harmless_test)


def make_plan(args, harmful_train, n_harmless, difficulty=None, lengths=None):
    levels = schedule.assign_levels(len(harmful_train), args.levels, args.levels_by, args.seed,
                                    categories=[e.category for e in harmful_train], difficulty=difficulty)
    options = schedule.plan_options(args)
    plan = schedule.build_plan(levels, n_harmless, **options, lengths=lengths)
    if args.sequence != "sequential" and plan == schedule.build_plan(levels, n_harmless, **{
            **options, "sequence": "sequential"}, lengths=lengths):
        # e.g. one batch per level and epoch: cyclic is then sequential, and an ablation row of it is the default
        log(f"note: --sequence {args.sequence} gives the same steps as --sequence sequential with these pool sizes, "
            f"--levels and --batch-size")
    return levels, plan


def print_plan(args, prompts):
    """--plan-only: the plan from pool sizes alone, no model loaded."""
    if args.levels_by == "difficulty":
        raise ValueError("--plan-only with --levels-by difficulty: the margins need the model; run once first")
    levels, plan = make_plan(args, prompts.harmful, len(prompts.harmless))
    print(schedule.describe(plan, schedule.Scales.from_args(args), max(levels) + 1))
    if args.filter_pairs:
        print("(pool sizes before --filter-pairs drops the pairs the teachers got wrong)")


class ResumeRefused(ValueError):
    """--resume on a checkpoint of other flags or data: train.py exits RESUME_REFUSED (the ablation grid
    then starts the cell's training over; any other failure it reports)."""


RESUME_REFUSED = 3


def check_out_folder(args):
    """The checkpoint to resume from (None for a new run). A new run stops rather than replace a run
    in --out; a resumed one stops when a flag that changes the result differs from the saved run."""
    if not args.resume and not args.overwrite and (
            os.path.exists(os.path.join(args.out, "metrics.jsonl")) or checkpoint.latest(args.out)):
        raise ValueError(f"--out {args.out} holds a run (metrics.jsonl, checkpoints): --resume to continue it, "
                         f"--overwrite to start over, or another --out")
    if not args.resume:
        return None
    resume_from = checkpoint.latest(args.out)
    if resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {args.out}/checkpoints")
    with open(os.path.join(resume_from, "args.json")) as f:
        saved = json.load(f)
    now = json.loads(json.dumps(vars(args)))
    default = vars(build_parser().parse_args([]))  # a flag added since the run was saved: its default then
    changed = [k for k in now if k not in _RUN_FLAGS_IGNORED_ON_RESUME + ("data_sha256",)
               and saved.get(k, default.get(k)) != now[k]]
    if changed:
        raise ResumeRefused(f"--resume: flags differ from the saved run: {', '.join('--' + k.replace('_', '-') for k in changed)}")
    if "data_sha256" in saved and saved["data_sha256"] != now.get("data_sha256"):  # runs saved before it: unchecked
        raise ResumeRefused(f"--resume: the training data changed since the saved run (sha256 of its prompts "
                         f"{saved['data_sha256'][:12]} → {now['data_sha256'][:12]}): restore the data files, "
                         f"or start over with --overwrite")
    return resume_from


def load_base(args, log):
    """The base model and its compute copy (teachers.Base); model-dependent flags are checked here,
    before any teacher is built."""
    offload = teachers.offloaded(args.offload, "base", args.bad_teacher)
    base = teachers.load_base(args.model, args.precision, args.device, args.attention, offload)
    if offload:
        log(f"--offload {args.offload}: the base model's layers stay in CPU memory")
    check_model_flags(args, base.fp32)
    data.check_chat_template(base.tokenizer, args.model)
    return base


def evaluate_teachers(args, found, harmless, log):
    """The teacher table on the training prompts (teacher_eval.json); stops when the good teacher
    does not refuse more than the bad one (unless --force)."""
    report = teacher_report({"good": found.answers["good"][0], "bad": found.answers["bad"][0]},
                            {"good": found.answers["good"][1], "bad": found.answers["bad"][1]},
                            [e.prompt for e in harmless])
    if parallel.is_main():
        data.write_atomic(os.path.join(args.out, "teacher_eval.json"), json.dumps(
            {"report": report, "models": found.keys, "prompts": "training prompts",
             "settings": evaluation.settings(seed=args.seed, data_seed=args.data_seed)}, indent=2))
    log("teacher evaluation on the training prompts:\n" + teacher_table(report))
    evaluation.check_teachers(report, args.force)
    return report


def training_pools(args, tokenizer, prompts, answers, log):
    """{side: Pool} of tokenised (prompt, answer) pairs (data.student_pairs) and the rejected harmless
    answers under --dpo-harmless. Returns (harmful, harmless, pools)."""
    pairs = data.student_pairs(prompts, answers, args.harmless_teacher, args.filter_pairs, log)
    (harmful, h_good, h_bad), (harmless, b_good, b_bad) = pairs["harmful"], pairs["harmless"]
    prefixes = [""] * len(harmful)
    if getattr(args, "deep_refusal", 0):  # runs saved before the flag: off
        deep = data.deep_refusal_examples(harmful, h_good, h_bad, tokenizer, args.deep_refusal, args.data_seed)
        log(f"--deep-refusal {args.deep_refusal}: {len(deep[0])} harmful pairs whose answer starts harmful added")
        harmful, h_good, h_bad, prefixes = (a + b for a, b in zip((harmful, h_good, h_bad, prefixes), deep))
    enc = lambda exs, ans, pre=None: [data.encode(tokenizer, e.prompt, a, args.max_prompt_tokens,
                                                  args.max_response_tokens, p)
                                      for e, a, p in zip(exs, ans, pre or [""] * len(exs))]
    pools = {"harmful": Pool(enc(harmful, h_good, prefixes), enc(harmful, h_bad, prefixes)),
             "harmless": Pool(enc(harmless, b_good))}
    if args.dpo_harmless != "none":
        rejected = (b_bad if args.dpo_harmless == "bad-teacher" else
                    [teachers.refusal_for(e.prompt, args.seed) for e in harmless])
        pools["harmless"].bad = enc(harmless, rejected)
    for part, flag in (("prompt", "--max-prompt-tokens"), ("response", "--max-response-tokens")):
        cut = sum(f["truncated"][part] for pool in pools.values() for feats in (pool.good, pool.bad or []) for f in feats)
        if cut:
            log(f"note: {cut} training {part}s longer than {flag} {getattr(args, flag[2:].replace('-', '_'))} were cut"
                + (" in the middle (start and end kept)" if part == "prompt" else ""))
    return harmful, harmless, pools


def make_student(args, base, log):
    """The student (a copy of the base, LoRA adapters if asked) and its optimizer."""
    student = copy.deepcopy(base.fp32).to(base.device)
    if args.fsdp:  # the shards stay fp32 and are the master weights; layers compute in compute dtype
        parallel.fsdp_wrap(student, optim.decoder_layers(student), compute_dtype(args))
        log(f"--fsdp: the student's parameters sharded over {parallel.rank_and_world()[1]} processes")
        return student, optim.MasterWeightOptimizer(student, compute_dtype=torch.float32, **optimizer_options(args))
    if args.lora_r:
        n = optim.add_lora(student, r=args.lora_r, dtype=compute_dtype(args), alpha=args.lora_alpha,
                     targets=args.lora_targets, dropout=args.lora_dropout, seed=args.seed)
        log(f"LoRA: rank {args.lora_r} adapters on {n} Linear layers")
    if args.gradient_checkpointing:
        optim.enable_checkpointing(student)
    return student, optim.MasterWeightOptimizer(student, compute_dtype=compute_dtype(args), **optimizer_options(args))


def unsharded(args, base, whole):
    """Under --fsdp, after training, on rank 0: the student from its gathered weights, held as a
    one-process run holds it, for saving and evaluation."""
    plain = copy.deepcopy(base.fp32).to(base.device)
    plain.load_state_dict(whole, strict=False)  # tied weights: one tensor under two names
    return plain, optim.MasterWeightOptimizer(plain, compute_dtype=compute_dtype(args), **optimizer_options(args))


def uses_hidden_terms(args):
    return bool(args.cb_alpha) or any(losses.TERMS[t].kind == "hidden" for t in args.loss)


def hidden_layers(args, student, log):
    """The residual positions hidden terms read: --cb-layers, default L/3 and 2L/3 (checked at load)."""
    if not uses_hidden_terms(args):
        return ()
    n_blocks = len(optim.decoder_layers(student))
    layers = args.cb_layers or [round(n_blocks / 3), round(2 * n_blocks / 3)]
    log(f"circuit breakers at residual positions {list(layers)} of {n_blocks}")
    return layers


def step_inputs(args, base, found, pools, harmful, student, log):
    """What the loop reads besides the student: the frozen models, the step settings and the plan.
    Checks a --micro-tokens budget before step 0, fills the top-k caches (--teacher-topk) and
    scores difficulty levels (--levels-by difficulty) with the reference."""
    cfg = StepConfig.from_args(args, hidden_layers(args, student, log))
    for side, pool in pools.items():  # a budget no single example fits stops here, not mid-run
        split_side(side, list(range(len(pool.good))), pool, cfg)
    harmless_teacher = (base.compute, base.key) if args.harmless_teacher == "base" else (found.good, found.keys["good"])
    if args.teacher_topk and any(losses.TERMS[t].kind == "token" for t in args.loss):
        by_teacher = {found.keys["good"]: (found.good, ["harmful"])}
        by_teacher.setdefault(harmless_teacher[1], (harmless_teacher[0], []))[1].append("harmless")
        for key, (model, sides) in by_teacher.items():  # one cache per teacher
            caches = teachers.teacher_topk_cache(model, key, {side: pools[side] for side in sides}, k=args.teacher_topk,
                                                 temperature=args.temperature, cache_dir=args.cache_dir,
                                                 micro_batch=args.micro_batch, log=log)
            for side, cache in caches.items():
                pools[side].topk = cache
    if args.teacher_topk:  # training reads the cache: the good teacher's memory is free until evaluation reloads it
        found.good = None
    frozen = Frozen(base.compute, found.good, base.compute if args.harmless_teacher == "base" else None)
    difficulty = None
    if args.levels_by == "difficulty":  # per-token margin of the bad answer over the good one
        h = pools["harmful"]
        ref_good, ref_bad = (optim.sequence_logps_of(base.compute, f, args.micro_batch) for f in (h.good, h.bad))
        difficulty = (ref_bad / optim.n_response(h.bad).clamp(min=1) - ref_good / optim.n_response(h.good).clamp(min=1)).tolist()
    levels, plan = make_plan(args, harmful, len(pools["harmless"].good), difficulty,
                             [example_lengths(pools[side], cfg.reads_bad(side)) for side in ("harmful", "harmless")])
    return frozen, cfg, levels, plan


def load_xstest_safe(args):
    """XSTest's safe prompts for the final evaluation; None with --xstest none or --no-eval."""
    if args.no_eval or not args.xstest or args.xstest.lower() == "none":
        return None
    return evaluation.xstest_safe_sample(args.xstest, args.eval_limit, args.data_seed)


def evaluate_run(args, student, student_dir, base, found, prompts, report, t_start, xstest=None):
    """Base, teachers and student on the held-out prompts (--eval-limit each) and XSTest (eval.json,
    eval.md); frozen models' rows come from the evaluation cache when another run computed them."""
    student.eval()
    test_h = data.stratified_sample(prompts.harmful_test, args.eval_limit, args.data_seed)
    test_b = data.stratified_sample(prompts.harmless_test, args.eval_limit, args.data_seed)
    good_path = os.path.join(args.teacher_dir, "good") if args.good_teacher == "align" else args.good_teacher
    # the good teacher was freed for training by --teacher-topk: reloaded only on a cache miss, once
    get_good = functools.cache(lambda: found.good if not args.teacher_topk
                               else teachers.load_frozen(good_path, teachers.TeacherFlags.from_args(args), base.device, "good")[0])
    toks = found.tokenizers or {"good": base.tokenizer, "bad": base.tokenizer}
    frozen = {"base": (base.key, lambda: base.compute, base.tokenizer),
              "good teacher": (found.keys["good"], get_good, toks["good"])}
    if found.bad is not base.compute:
        frozen["bad teacher"] = (found.keys["bad"], lambda: found.bad, toks["bad"])
    ident = lambda key, tok: evaluation.frozen_ident(key, base.key, tok, args.precision, base.device, args.attention)
    rows = evaluation.evaluate_models(frozen, student, base.tokenizer, test_h, test_b, xstest, args.xstest,
                                      args.cache_dir, ident)
    run_settings = evaluation.settings(
        model=args.model, models={"base": base.key, **found.keys, "student": student_dir}, seed=args.seed,
        data_seed=args.data_seed,
        data={"harmful_test": args.harmful_test or args.harmful or "builtin:test",
              "harmless_test": args.harmless_test or args.harmless or "builtin:test",
              "builtin_sha256": data.file_sha256(data.BUILTIN),
              "n_harmful": len(test_h), "n_harmless": len(test_b),
              "xstest": None if xstest is None else {"path": args.xstest, "sha256": data.file_sha256(args.xstest),
                                                     "n_safe": len(xstest)}},
        flags=vars(args), wall_seconds=round(time.time() - t_start, 1))
    payload = evaluation.report_models(rows, report, run_settings, args.out)
    print(f"\nwall time {time.time() - t_start:.0f} s; results in {args.out}/eval.json")
    return payload


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        payload = run(args)
        # the other ranks return while rank 0 saves: a rank destroying its gloo group before the others
        # are done aborted at exit (SIGABRT) in ~1 run of 5; on an error no barrier (it could hang)
        parallel.barrier()
        return payload
    except ResumeRefused as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(RESUME_REFUSED)
    except (data.DataError, teachers.ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        parallel.teardown()


def run(args):
    """The whole pipeline: check → data → base → teachers → pools → student → plan → loop → save → evaluate."""
    global RUN_START
    t_start = RUN_START = time.time()
    check_args(args)
    parallel.dist_setup()
    if args.fsdp and parallel.rank_and_world()[1] == 1:
        raise ValueError("--fsdp shards the student over processes: run it under torchrun --nproc-per-node N (N >= 2)")
    args.precision = parallel.from_main(args.precision)  # every rank computes in rank 0's precision
    args.out = os.path.normpath(args.out)  # runs/x/ and runs/x are one run: saved and current flags agree
    args.teacher_dir = os.path.normpath(args.teacher_dir or os.path.join(args.out, "teachers"))
    args.cache_dir = os.path.normpath(args.cache_dir or os.path.join(args.out, "cache"))
    for flag, path in (("--out", args.out), ("--teacher-dir", args.teacher_dir), ("--cache-dir", args.cache_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path}: is a file, not a folder")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    prompts = load_pools(args)
    xstest = load_xstest_safe(args)  # a bad --xstest stops here, before any model loads
    args.data_sha256 = data.prompts_sha256(prompts)  # saved in args.json: --resume checks the data did not change
    if args.plan_only:
        return print_plan(args, prompts)
    resume_from = None if args.teachers_only else check_out_folder(args)
    log(teachers.precision_line(args.precision_requested, args.device, args.precision))
    log(f"data: {len(prompts.harmful)} harmful / {len(prompts.harmless)} harmless training prompts, "
        f"{len(prompts.harmful_test)} / {len(prompts.harmless_test)} held out")
    if args.limit:  # a sample: say which categories it kept
        log(f"--limit {args.limit} (stratified by category): harmful {data.category_counts(prompts.harmful)}; "
            f"harmless {data.category_counts(prompts.harmless)}")
    base = load_base(args, log)
    parallel.main_first("before")  # rank 0 builds teachers and caches; the others then find them on disk
    found = teachers.prepare_teachers(teachers.TeacherFlags.from_args(args), base, prompts.harmful, prompts.harmless, log)
    if args.bad_teacher == "base":
        log(f"the base refuses {evaluation.response_stats(found.answers['bad'][0])['refusal_rate']:.1%} of the "
            f"harmful training prompts")
    report = evaluate_teachers(args, found, prompts.harmless, log)
    if args.teachers_only:
        parallel.main_first("after")
        log(f"--teachers-only: teachers in {args.teacher_dir}; no student trained")
        return None
    harmful, harmless, pools = training_pools(args, base.tokenizer, prompts, found.answers, log)
    student, opt = make_student(args, base, log)
    parallel.main_first("after")
    frozen, cfg, levels, plan = step_inputs(args, base, found, pools, harmful, student, log)
    start, canary = checkpoint.resume(args.out, resume_from, student, opt, len(plan), log)
    log(f"training: {len(plan)} optimizer steps, {max(levels) + 1} levels, loss {args.loss}")
    train_loop(args, student, opt, frozen, pools, cfg, plan, levels, start, canary, base)
    if args.fsdp:  # every rank takes part in gathering the shards
        whole, canary = parallel.gather_state(opt.master_state(student)), robust.whole_canary(canary)
    if not parallel.is_main():
        return None
    if args.fsdp:
        student, opt = unsharded(args, base, whole)
    student_dir = checkpoint.save_student(args.out, student, opt, canary, base)
    log(f"student saved to {student_dir} (last checkpoint {checkpoint.latest(args.out)})")
    if args.no_eval:
        return None
    return evaluate_run(args, student, student_dir, base, found, prompts, report, t_start, xstest)


if __name__ == "__main__":
    main()
