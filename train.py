"""Teacher-guided safety training: teachers → student → evaluation, in one hand-written loop.

    python train.py                      # the whole pipeline on the embedded SmolLM2-135M, offline
    python train.py --plan-only          # print the schedule (levels, batches, γ, lr) and stop
    python train.py --resume             # continue the run in --out from its last checkpoint

Pipeline: load data and the base model → build or load the good / bad teacher → generate and
cache their answers → teacher evaluation (stops if the good teacher is not better) → train along
the plan of schedule.py → evaluate base, good teacher and student on held-out prompts.

Each optimizer step minimises  L = γ(t) · L_harmful + λ · L_harmless  on one harmful batch and its
harmless examples (one backward per micro-batch, one clip, one update). Each side's loss is
Σ weight × term (weights from --loss), each term averaged over the side's examples or tokens:
    harmful side:   dpo  good answer (a refusal) chosen, bad answer rejected
                    npo  pushes down the bad teacher's answer
                    simnpo  reference-free, length-normalised npo
                    kl / kl_rev  to the good teacher on its own answer (its refusal)
                    sft  likelihood of the good teacher's refusal ("reward refusals")
                    cb   circuit-breaker rerouting (--cb-alpha)
    harmless side:  kl / kl_rev / sft  to the good teacher on its own answer
                    dpo  only with --dpo-harmless: the good teacher's answer chosen over the bad
                         teacher's (bad-teacher) or over a refusal (refusal)
                    cb_retain  circuit-breaker retain term (--cb-alpha)
The DPO / NPO reference is the frozen base (the initial student), run on the same micro-batch.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import eval as evaluation
import losses
import schedule
import teachers
from eval import teacher_report, teacher_table

# flags that do not change the result (or, like --recipe, only fill flags compared themselves): a
# resumed run may differ from the saved run in these, and must agree on every other flag
_RUN_FLAGS_IGNORED_ON_RESUME = ("resume", "overwrite", "plan_only", "no_eval", "force", "save_every", "eval_limit",
                                "xstest", "offload", "device", "precision_requested", "recipe")


def parse_loss(spec):
    weights = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in LOSS_TERMS:
            raise argparse.ArgumentTypeError(f"--loss: unknown term {name!r} (terms: {', '.join(LOSS_TERMS)})")
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
    "lr": _POSITIVE, "teacher_lr": _POSITIVE, "beta": _POSITIVE, "simnpo_beta": _POSITIVE,
    "temperature": _POSITIVE,
    "lat_eps": _NONNEGATIVE, "cb_alpha": _NONNEGATIVE, "lam": _NONNEGATIVE, "gamma_start": _NONNEGATIVE,
    "gamma_end": _NONNEGATIVE, "weight_decay": _NONNEGATIVE, "clip": _NONNEGATIVE, "warmup": _NONNEGATIVE,
    "harmless_ratio": _NONNEGATIVE, "dpo_harmless_weight": _NONNEGATIVE, "lora_r": _NONNEGATIVE,
    "test_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "canary_top": (lambda v: 0 < v <= 100, "in (0, 100]"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


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
    for name, (ok, what) in FLAG_RANGES.items():
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or not ok(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    fill_derived_flags(args)
    if getattr(args, "precision_requested", None) is None:  # auto resolved once; args.json keeps both
        args.precision_requested = args.precision
        args.precision = teachers.resolve_precision(args.precision, teachers.compute_device(args.device))[0]
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite: choose one")
    if args.lora_r and args.canary_mode != "off":
        raise ValueError("--canary-mode with --lora-r: canary params are entries of the full weight matrices, "
                         "which LoRA freezes; use full fine-tuning (--lora-r 0)")
    if args.dpo_harmless_weight is not None and (args.dpo_harmless == "none" or "dpo" not in args.loss):
        raise ValueError("--dpo-harmless-weight needs --dpo-harmless bad-teacher|refusal and a dpo term in --loss")


def check_model_flags(args, model):
    """Flags that depend on the model, checked right after it loads, before any teacher is built."""
    if args.cb_alpha or args.lat_eps:
        n_blocks = len(decoder_layers(model))
        for flag, layers in (("--cb-layers", args.cb_layers if args.cb_alpha else None),
                             ("--lat-layers", args.lat_layers if args.lat_eps else None)):
            if layers and any(not 0 <= l <= n_blocks for l in layers):
                raise ValueError(f"{flag} must lie in 0..{n_blocks} (0 = embeddings, l = block l), got {layers}")
    if args.lora_r:
        lora_linears(model, args.lora_targets)


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
                   help=f"weighted terms, e.g. dpo=1,npo=0.5,kl=1 (terms: {', '.join(LOSS_TERMS)})")
    g.add_argument("--beta", type=float, default=0.1, help="β of dpo and npo")
    g.add_argument("--simnpo-beta", type=float, default=2.5)
    g.add_argument("--simnpo-margin", type=float, default=0.0)
    g.add_argument("--temperature", type=float, default=1.0, help="τ of kl / kl_rev")
    g.add_argument("--dpo-harmless", choices=("none", "bad-teacher", "refusal"), default="none",
                   help="also dpo on harmless prompts, rejecting the bad teacher's answer or a refusal "
                        "(the latter directly penalises over-refusal)")
    g.add_argument("--dpo-harmless-weight", type=float, metavar="W",
                   help="weight of that harmless-side dpo term (default: the dpo weight of --loss)")
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
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank of the student (0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, help="LoRA α; the update is scaled by α/r (default 2·r: scale 2)")
    g.add_argument("--lora-targets", default=LORA_TARGETS,
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


# ---------------------------------------------------------------- optimizer with fp32 master weights

class NonFiniteError(ValueError):
    """A loss term or the gradient went NaN / inf: the run stops before the update is applied."""


class MasterWeightOptimizer:
    """AdamW / SGD on fp32 master copies of the trainable parameters; the model keeps a
    `compute_dtype` copy for forward and backward. bf16 weights alone would round away updates
    smaller than 2^-8 of a weight; the master copies keep them."""

    def __init__(self, model, *, compute_dtype, kind="adamw", lr=1e-5, weight_decay=0.0, state_device="same"):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.grads = [None] * len(self.params)  # fp32 sums of the micro-batches' gradients
        self.master = []
        for p in self.params:
            device = torch.device("cpu") if state_device == "cpu" else p.device
            separate = compute_dtype != torch.float32 or p.dtype != torch.float32 or device != p.device
            master = p.detach().to(device, torch.float32, copy=True) if separate else p
            self.master.append(master)
            p.data = p.data.to(compute_dtype)
        optimizer = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
        # fused: one kernel per tensor (CPU and CUDA), ~4× faster than the default per-tensor loop on CPU
        self.optimizer = optimizer(self.master, lr=lr, weight_decay=weight_decay, fused=True)

    def accumulate(self, keep=None):
        """Add the gradients of the last backward to fp32 sums and clear them: bf16 `.grad`
        accumulating over micro-batches would round each sum. keep: per parameter None (all
        entries), False (none) or a bool mask of the entries that take this gradient."""
        for i, p in enumerate(self.params):
            g, p.grad = p.grad, None
            k = None if keep is None else keep[i]
            if g is None or k is False:
                continue
            if k is not None:
                g = torch.where(k, g, 0.0)
            if self.grads[i] is None:
                self.grads[i] = g.float()
            else:
                self.grads[i].add_(g)  # bf16 added into the fp32 sum: no fp32 copy of g

    def step(self, lr, clip, frozen=None):
        """frozen: per parameter, None or a bool mask of entries this step may not move: their
        gradient is zeroed, and their value and their optimizer state (Adam moments, SGD momentum)
        are restored after the step, so weight decay cannot move them and their moments do not
        decay as if they had seen a zero gradient. The shared step count still advances."""
        self.accumulate()  # gradients of a backward not yet collected
        for m, g in zip(self.master, self.grads):
            m.grad = None if g is None else g.to(m.device)
        self.grads = [None] * len(self.params)
        masks = {}
        for m, f in zip(self.master, frozen or []):
            if f is not None and m.grad is not None:  # no gradient: the optimizer leaves m alone
                masks[m] = f.to(m.device)  # masks follow the model; masters may sit in CPU memory
                m.grad[masks[m]] = 0
        grads = [m for m in self.master if m.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"))
        if not math.isfinite(float(norm)):  # the weights are untouched: nothing non-finite is applied
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"the gradient norm is {float(norm)}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # parameters with frozen entries step one at a time, so the copies of their frozen values
        # and state (most of the model under focus) exist for one tensor at a time
        held = {m: m.grad for m in masks}
        for m in masks:
            m.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # each later step sees only its own parameter's gradient
        for m, f in masks.items():
            m.grad = held.pop(m)
            state = self.optimizer.state.get(m, {})
            values = m.detach()[f].clone()
            moments = {k: v[f].clone() for k, v in state.items() if self._per_entry(k, v, m)}
            self.optimizer.step()
            m.grad = None
            with torch.no_grad():
                m[f] = values
                for k, v in self.optimizer.state[m].items():
                    if self._per_entry(k, v, m):
                        # state created by this step starts at zero, as if these entries had none
                        v[f] = moments[k] if k in moments else 0
            del values, moments
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the compute copies from the masters: one fused call where both share a device
            local = [(p, m) for m, p in zip(self.master, self.params) if m is not p and m.device == p.device]
            if local:
                torch._foreach_copy_([p for p, _ in local], [m for _, m in local])
            for m, p in zip(self.master, self.params):
                if m is not p and m.device != p.device:  # masters in CPU memory (--optim-state-device cpu)
                    p.copy_(m)
        return float(norm)

    @staticmethod
    def _per_entry(key, value, param):
        """Whether an optimizer state entry holds one value per parameter entry (moments, momentum)."""
        return key != "step" and torch.is_tensor(value) and value.shape == param.shape

    def master_state(self, model):
        """The model's state dict with the fp32 master weights in place of the compute copies."""
        state = model.state_dict()
        names = {id(p): n for n, p in model.named_parameters()}
        for m, p in zip(self.master, self.params):
            state[names[id(p)]] = m
        return state

    def load_master(self, model, state):
        names = {id(p): n for n, p in model.named_parameters()}
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                m.copy_(state[names[id(p)]])
                if m is not p:
                    p.copy_(m)


# ---------------------------------------------------------------- LoRA and offloading

class LoRALinear(torch.nn.Module):
    """y = W x + b + (α/r) · B A dropout(x), W and b frozen. A starts Kaiming-uniform (as nn.Linear's
    own init), B at zero, so the adapted model starts exactly equal to the base."""

    def __init__(self, base, r, alpha, dropout=0.0, generator=None):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def forward(self, x):
        return self.base(x) + self.scale * torch.nn.functional.linear(
            torch.nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)


def enable_checkpointing(model):
    """Recompute activations in backward; transformers 5 renamed the method (the old name warns)."""
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()


def lora_linears(model, spec):
    """(name, Linear) of every layer named in the comma-separated --lora-targets `spec`."""
    targets = {t.strip() for t in spec.split(",") if t.strip()}
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        raise ValueError(f"--lora-targets: no Linear layer named {', '.join(sorted(targets))} in "
                         f"{type(model).__name__} (it has {', '.join(sorted(names))})")
    return found


LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def add_lora(model, *, r, dtype, alpha=None, targets=LORA_TARGETS, dropout=0.0, seed=0):
    """Freeze the model (cast to the compute dtype: no master copies are kept of frozen weights) and
    wrap every Linear named in `targets` in a LoRALinear of rank r (α default 2r: scale 2); only the
    adapters train. The same seed gives the same adapters."""
    if r < 1 or not 0 <= dropout < 1:
        raise ValueError("--lora-r must be ≥ 1 and --lora-dropout in [0, 1)")
    if "lm_head" in [t.strip() for t in targets.split(",")] and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("--lora-targets: lm_head is tied to the embeddings in this model; adapt other layers")
    found = lora_linears(model, targets)
    teachers.cast_parameters(model.requires_grad_(False), dtype)
    generator = torch.Generator(model.device).manual_seed(seed)
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                LoRALinear(module, r, 2.0 * r if alpha is None else alpha, dropout, generator))
    return len(found)


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def student_state(model, opt, original=None):
    """What a checkpoint or student/ stores: the fp32 master weights; with LoRA, every adapted
    weight merged (W + α/r · B A in fp32) under the plain model's names, and the frozen weights taken
    from `original` (the fp32 base) when given, since the student holds them only in compute dtype."""
    state = opt.master_state(model)
    loras = lora_modules(model)
    if not loras:
        return state
    rename = {f"{n}.base.{s}": f"{n}.{s}" for n in loras for s in ("weight", "bias")}
    out = {rename.get(k, k): v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")}
    if original is not None:
        out = {k: original[k] if k in original else v for k, v in out.items()}
    for n, m in loras.items():
        w = out[n + ".weight"].float()
        out[n + ".weight"] = w + m.scale * (state[n + ".lora_B"].float() @ state[n + ".lora_A"].float()).to(w.device)
    return out


def adapter_state(model, opt):
    """The fp32 master values of the LoRA adapters, by parameter name: all that exact resume needs."""
    return {k: v for k, v in opt.master_state(model).items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


# ---------------------------------------------------------------- forward passes

def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: LAT / circuit breakers need a decoder with .model.layers")
    return layers


def residual_module(model, position):
    """The module whose output is residual-stream position `position`: 0 = the embeddings,
    l = block l (before the final norm). LAT writes and circuit breakers read at the same places."""
    return model.get_input_embeddings() if position == 0 else decoder_layers(model)[position - 1]


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def residual_capture(model, positions):
    """Yields {position: [B, T, H] residual stream} filled by the next forward. Hooks registered here
    run after any `residual_perturbation` entered before, so a captured state includes δ: the
    stream the following block reads (one fixed rule, whatever hooks transformers installs)."""
    store, handles = {}, []
    try:
        for l in positions:
            handles.append(residual_module(model, l).register_forward_hook(
                lambda mod, inputs, output, l=l: store.__setitem__(l, _output_tensor(output))))
        yield store
    finally:
        for h in handles:
            h.remove()


def forward(model, feats, keep=None, capture=()):
    """(logits, labels) of a left-padded batch, for its last K positions only (K = longest
    response + 1). Losses read no prompt logits, and the vocabulary projection and its
    log-softmax are the largest tensors of a step; left padding puts every response at the end.
    With `capture` (residual positions) it also returns the hidden states at those positions
    ([B, T, H] each, all positions), the full-width labels and the real-token mask."""
    batch = data.collate(feats, model.config.pad_token_id or 0, side="left")
    keep = keep or int(n_response(feats).max()) + 1
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    with residual_capture(model, capture) as hidden:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=keep, use_cache=False)
    labels = batch["labels"].to(device)
    if capture:
        return out.logits, labels[:, -keep:], [hidden[l] for l in capture], labels, mask.bool()
    return out.logits, labels[:, -keep:]


def n_response(feats):
    return torch.tensor([sum(t != data.IGNORE for t in f["labels"]) for f in feats], dtype=torch.float)


@torch.no_grad()
def sequence_logps_of(model, feats, micro_batch):
    """Sequence log-probs of many examples, in micro-batches."""
    out = []
    for part in tqdm(list(schedule.chunks(feats, micro_batch)), desc="log-probs", unit="batch", leave=False):
        logits, labels = forward(model, part)
        out.append(losses.sequence_logps(logits, labels).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------- LAT: perturbing the residual stream

def _add_to_output(delta):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype),) + tuple(output[1:])
        return output + delta.to(output.dtype)
    return hook


@contextlib.contextmanager
def residual_perturbation(model, deltas):
    """Adds deltas[l] ([B, T, H]) to the residual stream at position l (see `residual_module`).
    The hooks are removed however the block exits."""
    handles = []
    try:
        for l, delta in deltas.items():
            handles.append(residual_module(model, l).register_forward_hook(_add_to_output(delta)))
        yield
    finally:
        for h in handles:
            h.remove()


def lat_search(model, feats, n_good, *, layers, eps, steps):
    """Latent adversarial perturbation: one δ per token at each of --lat-layers, found by K
    normalised gradient steps (step ε for K=1, as in Vaccine; 2.5ε/K otherwise, as in PGD) that
    raise the log-prob of the bad answers (rows n_good:) and lower that of the good ones
    (rows :n_good), each δ_t projected onto ‖δ_t‖₂ ≤ ε. Gradients are taken with respect to δ
    only, so the weights are untouched by the search."""
    width = max(len(f["input_ids"]) for f in feats)
    embed = model.get_input_embeddings().weight
    deltas = {l: torch.zeros(len(feats), width, embed.shape[1], device=embed.device, requires_grad=True)
              for l in layers}
    step_size = eps if steps == 1 else 2.5 * eps / steps
    for _ in range(steps):
        with residual_perturbation(model, deltas):
            logits, labels = forward(model, feats)
        logps = losses.sequence_logps(logits, labels)
        objective = logps[:n_good].sum() - logps[n_good:].sum()  # minimised: the attacker's goal
        grads = torch.autograd.grad(objective, list(deltas.values()))
        with torch.no_grad():
            for delta, g in zip(deltas.values(), grads):
                delta -= step_size * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                delta *= (eps / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
    return {l: d.detach() for l, d in deltas.items()}


# ---------------------------------------------------------------- canary params

def canary_scores(model, feats, micro_batch, method="saliency"):
    """Per-entry score of every weight matrix: saliency |w · ∂L/∂w| with L the NLL of the bad
    teacher's answers on harmful prompts, or Wanda's |w|·‖x‖ (‖x‖: L2 norm of the input feature over
    the non-padding tokens of the same examples; matrices that are not a Linear's weight get no
    Wanda score)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    if method == "saliency":
        model.zero_grad(set_to_none=True)
        tokens = float(n_response(feats).sum())
        for part in schedule.chunks(feats, micro_batch):
            logits, labels = forward(model, part)
            (-losses.sequence_logps(logits, labels).sum() / tokens).backward()
        scores = {n: (p.detach().float() * p.grad.float()).abs() for n, p in params.items() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return scores
    by_weight = {id(p): n for n, p in params.items()}
    device = next(model.parameters()).device
    sq, handles, real = {}, [], {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) in by_weight:
            name = by_weight[id(module.weight)]

            def hook(mod, inputs, output, name=name):
                x, mask = inputs[0].detach().float(), real["mask"]
                if x.shape[:-1] == mask.shape:
                    x = x[mask]
                elif x.ndim == 2 and x.shape[0] == mask.numel():
                    x = x[mask.flatten()]
                else:  # e.g. MoE experts see routed token subsets: which rows are padding is unknown
                    raise ValueError(f"--canary-score wanda: {name} sees input {tuple(x.shape)}, not one row "
                                     f"per token of the {tuple(mask.shape)} batch")
                sq[name] = sq.get(name, 0) + (x * x).sum(0)  # only real tokens: padding would scale ‖x‖ with width
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for part in schedule.chunks(feats, micro_batch):
                batch = data.collate(part, model.config.pad_token_id or 0)
                mask = batch["attention_mask"].to(device)
                real["mask"] = mask.bool()
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: params[n].detach().float().abs() * sq[n].sqrt()[None, :] for n in sq}


def canary_masks(scores, fraction):
    """Per tensor, the top `fraction` of entries by score (at least one) as a bool mask."""
    masks = {}
    for name, score in scores.items():
        k = max(1, round(score.numel() * fraction))
        flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        flat[score.flatten().topk(k).indices] = True
        masks[name] = flat.view_as(score)
    return masks


def jaccard(a, b):
    inter = sum(int((a[n] & b[n]).sum()) for n in a if n in b)
    union = sum(int(m.sum()) for m in a.values()) + sum(int(m.sum()) for m in b.values()) - inter
    return inter / max(union, 1)


def canary_drift(masks, model_state, initial):
    """Mean |w − w₀| on canary entries and on the rest (w₀: the initial student)."""
    on = off = n_on = n_off = 0.0
    for name, w in model_state.items():
        if name not in initial:
            continue
        d = (w.float() - initial[name].to(w.device, torch.float32)).abs()
        m = masks.get(name)
        if m is not None:
            on, n_on = on + float(d[m].sum()), n_on + int(m.sum())
            off, n_off = off + float(d[~m].sum()), n_off + int((~m).sum())
        else:
            off, n_off = off + float(d.sum()), n_off + d.numel()
    return on / max(n_on, 1), off / max(n_off, 1)


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


@dataclass(frozen=True)
class StepConfig:
    """The flags one optimizer step reads (see build_parser for each)."""
    loss: dict                        # {term: weight} of --loss, the harmful side's terms
    lam: float = 1.0
    dpo_harmless: str = "none"
    dpo_harmless_weight: float = None
    beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_margin: float = 0.0
    temperature: float = 1.0
    cb_alpha: float = 0.0
    cb_layers: tuple = ()             # resolved positions (run: default L/3 and 2L/3)
    lat_eps: float = 0.0
    lat_steps: int = 1
    lat_layers: tuple = (0,)
    micro_batch: int = 8
    micro_tokens: int = 0
    clip: float = 1.0
    canary_mode: str = "off"

    @classmethod
    def from_args(cls, args, cb_layers=()):
        flags = {k: getattr(args, k) for k in cls.__dataclass_fields__ if k != "cb_layers"}
        return cls(**flags, cb_layers=tuple(cb_layers or ()))

    def weights(self, side, cb_coef=(0.0, 0.0)):
        """{term: weight} a side computes: all of --loss on the harmful side; on the harmless side the
        HARMLESS_TERMS, dpo only under --dpo-harmless (with its own weight if given); plus the side's
        circuit-breaker term with its cross-faded weight."""
        if side == "harmful":
            weights = dict(self.loss)
        else:
            weights = {k: v for k, v in self.loss.items()
                       if k in HARMLESS_TERMS and (k != "dpo" or self.dpo_harmless != "none")}
            if "dpo" in weights and self.dpo_harmless_weight is not None:
                weights["dpo"] = self.dpo_harmless_weight
        if self.cb_alpha:
            weights["cb" if side == "harmful" else "cb_retain"] = cb_coef[0 if side == "harmful" else 1]
        return weights

    def reads_bad(self, side):
        """Whether a side's forward holds the bad answers (rows n:) besides the good ones."""
        return (any(t in self.weights(side) for t in READS_BAD)
                or (side == "harmful" and (self.lat_eps > 0 or self.cb_alpha > 0)))


class SequenceLogps:
    """Sequence log-probs of one micro-batch: student and reference, good rows and bad rows."""

    def __init__(self, logps, ref_logps, n, bad_tokens):
        self.good, self.bad = logps[:n], logps[n:]
        self.ref_good = self.ref_bad = None
        if ref_logps is not None:
            self.ref_good, self.ref_bad = ref_logps[:n], ref_logps[n:]
        self.n, self.bad_tokens = n, bad_tokens


# The loss terms, by what they read. Each entry: (what the term is averaged over across a whole
# side, its sum over one micro-batch). Averaging by the side's total, not the micro-batch's, makes
# splitting a side into micro-batches change nothing. Adding a term: its function in losses.py and
# one line here (READS_BAD / READS_REFERENCE / HARMLESS_TERMS if it reads those or runs on both sides).
SEQUENCE_TERMS = {  # from sequence log-probs s (SequenceLogps), per example
    "dpo": ("examples", lambda s, c: losses.dpo(s.good, s.bad, s.ref_good, s.ref_bad, c.beta) * s.n),
    "npo": ("examples", lambda s, c: losses.npo(s.bad, s.ref_bad, c.beta) * s.n),
    "simnpo": ("examples", lambda s, c: losses.simnpo(s.bad, s.bad_tokens, c.simnpo_beta, c.simnpo_margin) * s.n),
    "sft": ("good_tokens", lambda s, c: -s.good.sum()),
}
TOKEN_TERMS = {  # from next-token distributions on the good answer x against the teacher's: its full
    # logits t = (logits,) or its cached top-k t = (ids, logps, tail); token mean over mask m
    "kl": ("good_tokens", lambda x, t, m, c: (losses.kl if len(t) == 1 else losses.kl_topk)(x, *t, m, c.temperature)),
    "kl_rev": ("good_tokens",
               lambda x, t, m, c: (losses.kl_rev if len(t) == 1 else losses.kl_rev_topk)(x, *t, m, c.temperature)),
}
HIDDEN_TERMS = {  # from the residual stream h at the circuit-breaker layers against the reference's r (--cb-alpha)
    "cb": ("bad_tokens", lambda h, r, m: losses.cb_reroute(h, r, m)),             # the bad answer's tokens
    "cb_retain": ("good_real_tokens", lambda h, r, m: losses.cb_retain(h, r, m)),  # every real harmless token
}
LOSS_TERMS = (*SEQUENCE_TERMS, *TOKEN_TERMS)  # what --loss accepts (the cb terms come with --cb-alpha)
HARMLESS_TERMS = ("kl", "kl_rev", "sft", "dpo")  # computed on harmless steps too (dpo only under --dpo-harmless)
READS_BAD = ("dpo", "npo", "simnpo")
READS_REFERENCE = ("dpo", "npo")
TERM_UNIT = {k: v[0] for table in (SEQUENCE_TERMS, TOKEN_TERMS, HIDDEN_TERMS) for k, v in table.items()}


def side_totals(pool, idx):
    """The normalisers of TERM_UNIT over a whole side of a step."""
    good = [pool.good[i] for i in idx]
    bad = [pool.bad[i] for i in idx] if pool.bad else []
    return {"examples": float(len(idx)), "good_tokens": float(n_response(good).sum()),
            "bad_tokens": float(n_response(bad).sum()) if bad else 0.0,
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
    return schedule.split_batch(shard(indices), cfg.micro_batch, cfg.micro_tokens, lengths, 2 if reads_bad else 1)


def sequence_terms(s, weights, cfg):
    return {k: fn(s, cfg) for k, (_, fn) in SEQUENCE_TERMS.items() if k in weights}


def token_terms(logits, labels, good, idx, pool, good_teacher, weights, cfg):
    """Σ over response tokens of kl / kl_rev to the good teacher: from its cached top-k
    (--teacher-topk) or from a forward of the teacher on the good rows."""
    if pool.topk is not None:
        mask = losses.response_mask(labels)
        teacher = pool.topk.window(idx, mask)
    else:
        with torch.no_grad():
            teacher_logits, _ = forward(good_teacher, good, keep=logits.shape[1])
        # the good rows may be shorter than the kept window: what lies left of them is padding
        width = teacher_logits.shape[1]
        logits, labels = logits[:, -width:], labels[:, -width:]
        mask = losses.response_mask(labels)
        teacher = (teacher_logits,)
    return {k: fn(logits, teacher, mask, cfg) * float(mask.sum()) for k, (_, fn) in TOKEN_TERMS.items() if k in weights}


def hidden_terms(side, out, ref, n, weights):
    """Σ over tokens of the side's circuit-breaker term: rerouting the bad answer's tokens (rows n:
    of both forwards, same layout) or retaining every real token of the harmless example."""
    name = "cb" if side == "harmful" else "cb_retain"
    if name not in weights:
        return {}
    if side == "harmful":
        rows, mask = slice(n, 2 * n), out[3][n:] != data.IGNORE
    else:
        rows, mask = slice(0, n), out[4][:n]
    mean = HIDDEN_TERMS[name][1]([h[rows] for h in out[2]], [h[rows] for h in ref[2]], mask)
    return {name: mean * float(mask.sum())}


def term_sums(student, frozen, side, idx, pool, cfg, weights):
    """Sums over one micro-batch (per example or per token, see TERM_UNIT) of every term in
    `weights`, and log statistics summed over its examples.

    Rows of the student's forward: the good answers, then the bad ones when the side reads them.
    The reference runs on the very same batch, so its log-probs match the student's bit for bit
    before the first update, in bf16 too."""
    good = [pool.good[i] for i in idx]
    bad = [pool.bad[i] for i in idx] if cfg.reads_bad(side) else []
    feats, n = good + bad, len(idx)
    cb_layers = cfg.cb_layers if ("cb" in weights or "cb_retain" in weights) else []
    deltas = (lat_search(student, feats, n, layers=cfg.lat_layers, eps=cfg.lat_eps, steps=cfg.lat_steps)
              if side == "harmful" and cfg.lat_eps > 0 else {})
    with residual_perturbation(student, deltas):  # the harmful side trains under δ
        out = forward(student, feats, capture=cb_layers)
    logits, labels = out[:2]
    ref, ref_logps, stats = None, None, {}
    if any(t in weights for t in READS_REFERENCE) or cb_layers:
        with torch.no_grad():
            ref = forward(frozen.reference, feats, keep=logits.shape[1], capture=cb_layers)
        ref_logps = losses.sequence_logps(ref[0], labels).to(logits.device)
    s = SequenceLogps(losses.sequence_logps(logits, labels), ref_logps, n,
                      n_response(bad).to(logits.device) if bad else None)
    if ref_logps is not None:
        stats["good_logp_change"] = float((s.good.detach() - s.ref_good).sum())
        if bad:
            stats["bad_logp_change"] = float((s.bad.detach() - s.ref_bad).sum())
    if "dpo" in weights:
        margin = (s.good.detach() - s.ref_good) - (s.bad.detach() - s.ref_bad)
        stats["dpo_margin"], stats["dpo_accuracy"] = float(margin.sum()), float((margin > 0).float().sum())
    sums = sequence_terms(s, weights, cfg)
    if any(k in weights for k in TOKEN_TERMS):
        sums.update(token_terms(logits[:n], labels[:n], good, idx, pool, frozen.good_teacher, weights, cfg))
    if cb_layers:
        sums.update(hidden_terms(side, out, ref, n, weights))
    return sums, stats


def canary_keep(masks, mode, side, opt):
    """Per trainable parameter, which entries take this side's gradient: None = all, False = none,
    or a bool mask. focus: the harmful side moves only canary entries; protect: the harmless side
    may not move them; monitor: no restriction."""
    if not masks or mode not in ("focus", "protect"):
        return None
    if mode == "focus" and side == "harmful":
        return [masks[n] if n in masks else False for n in opt.names]
    if mode == "protect" and side == "harmless":
        return [~masks[n] if n in masks else None for n in opt.names]
    return None


def frozen_from(keeps, params):
    """Entries that no computed side may move; their value and optimizer state stay as they are."""
    if not keeps or any(k is None for k in keeps):
        return None
    out = []
    for i, p in enumerate(params):
        sides = [k[i] for k in keeps]
        if any(side is None for side in sides):
            out.append(None)
            continue
        frozen = torch.ones_like(p, dtype=torch.bool)
        for side in sides:
            if side is not False:
                frozen &= ~side
        out.append(frozen)
    return out


def run_step(student, frozen, opt, step, pools, cfg, gamma, lr, progress=0.0, masks=None):
    """One optimizer step on L = γ·L_harmful + λ·L_harmless over the step's harmful and harmless
    examples: micro-batches go through backward one by one, their gradients are summed in fp32,
    then one clip and one update. A side whose weight is 0 is not computed. `progress` (steps done /
    total) cross-fades the circuit-breaker weights; `masks` are the canary masks (--canary-mode)."""
    cb_coef = (cfg.cb_alpha * (1 - progress / 2), cfg.cb_alpha * progress / 2)
    row, keeps = {"loss": 0.0}, []
    student.train()
    for side, indices, scale in (("harmful", step.harmful, gamma), ("harmless", step.harmless, cfg.lam)):
        weights = cfg.weights(side, cb_coef)
        if not indices or scale == 0 or not any(weights.values()):
            continue
        totals = side_totals(pools[side], indices)
        keep = canary_keep(masks, cfg.canary_mode, side, opt)
        keeps.append(keep)
        logged = {}
        for idx in split_side(side, indices, pools[side], cfg):
            sums, stats = term_sums(student, frozen, side, idx, pools[side], cfg, weights)
            for k, v in sums.items():  # stop before a non-finite value reaches the weights
                if not torch.isfinite(v.detach()).all():
                    raise NonFiniteError(f"the {side} term {k} is {float(v.detach())}")
            side_loss = sum(weights[k] * v / totals[TERM_UNIT[k]] for k, v in sums.items())
            (scale * side_loss).backward()
            opt.accumulate(keep)
            for k, v in sums.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / totals[TERM_UNIT[k]]
            for k, v in stats.items():
                logged[k] = logged.get(k, 0.0) + v / totals["examples"]
            logged["loss"] = logged.get("loss", 0.0) + float(side_loss.detach())
        logged = sum_over_ranks(logged)
        row["loss"] += scale * logged["loss"]
        row.update({f"{side}_{k}": v for k, v in logged.items()})
    if not keeps:
        return {"skipped": True}
    all_reduce_grads(opt)
    row["grad_norm"] = opt.step(lr, cfg.clip, frozen_from(keeps, opt.params))
    if cfg.cb_alpha:
        row["cb_coef"], row["cb_retain_coef"] = cb_coef
    return row


def features_digest(feats):
    """sha256 of tokenised examples (ids and labels): part of every cache key that depends on the data."""
    return hashlib.sha256(json.dumps([[f["input_ids"], f["labels"]] for f in feats]).encode()).hexdigest()


def teacher_topk_cache(good, good_key, pools, *, k, temperature, cache_dir, micro_batch, log):
    """{side: TopkCache} of the good teacher on every good answer a kl term reads (both pools), computed
    once under `cache_dir`, keyed by teacher, tokenised data, k and τ; `good` is run only when missing."""
    goods = {side: pool.good for side, pool in pools.items()}
    cache_id = [good_key, k, temperature, features_digest(f for feats in goods.values() for f in feats)]
    folder = teachers.topk_cache_dir(cache_dir, cache_id)
    missing = teachers.topk_missing(folder, goods)
    if not missing:
        log(f"teacher top-{k}: reusing {folder}")
    else:  # a folder that lacks a file was damaged by hand or by a tool: rebuilt, not read
        log(f"teacher top-{k}: computing {folder}" if not os.path.isdir(folder) else
            f"teacher top-{k}: rebuilding {folder}, it has no {', '.join(missing)}")
        k_used = min(k, good.get_output_embeddings().weight.shape[0])
        teachers.build_topk_cache(folder, cache_id, goods, lambda feats: forward(good, feats), k_used, temperature,
                                  micro_batch)
    return {side: teachers.TopkCache(folder, side) for side in goods}


def sft_features(tokenizer, pairs, *, max_prompt_tokens=256, max_response_tokens=32, micro_tokens=0,
                 flag="--micro-tokens"):
    """sft's tokenised pairs and their lengths; a `micro_tokens` budget no example fits stops here,
    before any step, with an error naming `flag`."""
    feats = [data.encode(tokenizer, p, r, max_prompt_tokens, max_response_tokens) for p, r in pairs]
    lengths = [len(f["input_ids"]) for f in feats]
    if micro_tokens:
        schedule.micro_batches(range(len(feats)), lengths, 1, micro_tokens, flag)
    return feats, lengths


def sft(model, features, *, epochs, lr, batch_size, micro_batch=8, micro_tokens=0, seed=0, clip=1.0,
        optimizer="adamw", weight_decay=0.0, compute_dtype=torch.bfloat16, state_device="same",
        lr_schedule="cosine", warmup=None, after_step=None, desc="sft"):
    """Plain supervised fine-tuning on sft_features(...) = (features, lengths): mean NLL of the
    response tokens of each batch, the same optimizer and precision as the student, seeded shuffles.
    Builds the teachers and runs the fine-tuning attack (attack.py passes its lr schedule and
    `after_step(steps_done, model)`). Returns the model in eval mode."""
    feats, lengths = features
    opt = MasterWeightOptimizer(model, compute_dtype=compute_dtype, kind=optimizer, lr=lr, weight_decay=weight_decay,
                                state_device=state_device)
    steps = [batch for e in range(epochs)
             for batch in schedule.chunks(
                 np.random.default_rng([seed, data.Seed.SFT_SHUFFLE, e]).permutation(len(feats)).tolist(), batch_size)]
    warmup = min(2, len(steps) - 1) if warmup is None else warmup
    bar = tqdm(steps, desc=desc, leave=False)
    model.train()
    for t, batch in enumerate(bar):
        tokens = float(n_response([feats[i] for i in batch]).sum())
        total = 0.0
        for part in schedule.split_batch(batch, micro_batch, micro_tokens, lengths):
            logits, labels = forward(model, [feats[j] for j in part])
            loss = -losses.sequence_logps(logits, labels).sum() / tokens
            loss.backward()
            opt.accumulate()
            total += float(loss.detach())
        try:
            opt.step(schedule.lr_at(t, len(steps), lr, lr_schedule, warmup), clip)
        except NonFiniteError as e:
            raise NonFiniteError(f"{desc} step {t}: {e}") from None
        bar.set_postfix(nll=f"{total:.3f}")
        if after_step:
            after_step(t + 1, model)
    model.eval()
    return model


# ---------------------------------------------------------------- data parallel (torchrun)

# rank 0 may spend long building teachers while the other ranks wait at a barrier
DIST_TIMEOUT = datetime.timedelta(hours=6)


def dist_setup():
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo for CPU tensors,
    NCCL for CUDA ones. A plain `python train.py` stays a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=DIST_TIMEOUT)


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    return rank_and_world()[0] == 0


def shard(indices):
    """This rank's contiguous slice of a global batch (possibly empty). Contiguous, so when
    --micro-batch divides the slice the micro-batches are exactly those of one process."""
    rank, world = rank_and_world()
    return indices[rank * len(indices) // world:(rank + 1) * len(indices) // world]


def all_reduce_grads(opt):
    """Sum the fp32 gradient sums over ranks, once per optimizer step. Each rank's loss is already
    scaled by its share of the global batch (run_step divides by the whole side's totals), so the
    sum is the one-process gradient. Explicit rather than the DDP wrapper: the student is also run
    forward and backward outside the update (LAT's δ search, canary scores), which DDP would
    all-reduce, and the fp32 master copies live outside the module. A parameter no rank has a
    gradient for keeps None, so AdamW skips it as one process would."""
    if not dist.is_initialized():
        return
    opt.accumulate()
    has = torch.tensor([g is not None for g in opt.grads], dtype=torch.int32)
    dist.all_reduce(has)
    pending = []
    for i, (p, n) in enumerate(zip(opt.params, has.tolist())):
        if n:
            if opt.grads[i] is None:
                opt.grads[i] = torch.zeros(p.shape, device=p.device)
            pending.append(dist.all_reduce(opt.grads[i], async_op=True))
    for work in pending:
        work.wait()


def sum_over_ranks(totals):
    """Logged values (each already a share of the global batch) summed in rank order, so the
    metrics are the global batch's, as one process logs them."""
    if not dist.is_initialized():
        return totals
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, totals)
    out = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def main_first(phase):
    """Around work that writes shared files (teachers, answer caches, reference log-probs): the
    other ranks wait at phase 'before' until rank 0 reaches 'after', then redo the work, finding
    everything on disk. Without a shared disk each rank computes the same deterministic result."""
    if dist.is_initialized() and (phase == "before") != is_main():
        dist.barrier()


# ---------------------------------------------------------------- checkpoints

def save_masks(masks, folder):
    """Canary masks beside the weights, so an evaluation can measure how far an attack moved them."""
    save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in masks.items()},
              os.path.join(folder, "canary_masks.safetensors"))


def gather_canaries(model, canary, step, t, bad, levels, *, every, samples, top, score, micro_batch, seed):
    """Sets canary["masks"] / canary["key"] for this step. Masks are scored once per epoch, once per
    (epoch, level), or for every harmful batch (--canary-every), on at most --canary-samples of that
    scope's harmful examples (their bad answers). Under --sequence cyclic|mixed the levels interleave
    batch by batch: a level already scored in this epoch gets its masks back from canary["store"]
    instead of being scored again. Returns log fields."""
    count = lambda masks: {"canary_count": sum(int(m.sum()) for m in masks.values())} if masks else {}
    store = canary.setdefault("store", {})
    if canary.get("masks") and canary.get("key") is not None:
        store.setdefault(canary["key"], canary["masks"])
    if every == "batch" and not step.harmful:  # no harmful batch to score: keep the masks
        return count(canary["masks"])
    key = {"epoch": int(step.epoch), "level": (int(step.epoch), int(step.level)), "batch": int(t)}[every]
    if key in store:
        canary["masks"], canary["key"] = store[key], key
        return count(store[key])
    scope = {"epoch": range(len(levels)), "level": [i for i, lv in enumerate(levels) if lv == step.level],
             "batch": step.harmful}[every]
    scope = list(scope)
    if len(scope) > samples:
        pick = np.random.default_rng([seed, data.Seed.CANARY_SAMPLE, t]).choice(len(scope), samples, replace=False)
        scope = [scope[i] for i in sorted(pick)]
    was_training = model.training
    new = canary_masks(canary_scores(model, [bad[i] for i in scope], micro_batch, score), top / 100)
    model.train(was_training)
    out = {**count(new), "canary_gathered": True}
    if canary["masks"]:
        out["canary_jaccard"] = jaccard(canary["masks"], new)
    # only this epoch's levels can come back; every other key is seen once
    canary["store"] = {k: v for k, v in store.items() if every == "level" and k[0] == step.epoch}
    canary["store"][key] = new
    canary["masks"], canary["key"] = new, key
    return out


def save_checkpoint(path, model, tokenizer, opt, step, flags, canary=None, original=None):
    """A resumable checkpoint: weights (merged for transformers), adapters under LoRA, optimizer and RNG
    state, canary masks, and the run's `flags` ({flag: value}, args.json). Written to a temporary
    folder and renamed."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    teachers.save_model(model, tokenizer, tmp, state_dict=student_state(model, opt, original))
    if lora_modules(model):  # the merged weights above are for transformers; resume reads the adapters
        save_file({k: v.contiguous().cpu() for k, v in adapter_state(model, opt).items()},
                  os.path.join(tmp, "adapter.safetensors"))
    key = canary["key"] if canary else None
    stored = [k for k in (canary or {}).get("store", {}) if k != key]  # levels to reuse later in this epoch
    # plain tensors, ints, tuples and lists only: resume loads this with weights_only=True
    torch.save({"step": step, "optimizer": opt.optimizer.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "canary_key": key, "canary_stored": stored}, os.path.join(tmp, "trainer_state.pt"))
    if canary and canary["masks"]:
        save_masks(canary["masks"], tmp)
    if stored:
        save_file({f"{i}/{n}": m.to(torch.uint8).contiguous().cpu()
                   for i, k in enumerate(stored) for n, m in canary["store"][k].items()},
                  os.path.join(tmp, "canary_store.safetensors"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(flags, f, indent=2)
    data.replace_folder(tmp, path)  # a checkpoint is either complete or absent


def restore_rng(state):
    """CPU and CUDA generators as trainer_state.pt saved them. A run saved without CUDA leaves the
    CUDA generators as they are; one saved with CUDA and resumed without it ignores them."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"][:torch.cuda.device_count()])


def load_canary(folder, state, device):
    """The canary state save_checkpoint wrote: current masks and key, and the masks of the levels
    already scored in this epoch (keys from trainer_state.pt `state`)."""
    canary = {"masks": None, "key": None, "store": {}}
    path = os.path.join(folder, "canary_masks.safetensors")
    if os.path.exists(path):
        canary["masks"] = {k: v.bool().to(device) for k, v in load_file(path).items()}
        canary["key"] = state["canary_key"]
        canary["store"][canary["key"]] = canary["masks"]
    stored = state.get("canary_stored") or []
    if stored:
        flat = load_file(os.path.join(folder, "canary_store.safetensors"))
        for i, key in enumerate(stored):
            canary["store"][key] = {n.split("/", 1)[1]: v.bool().to(device) for n, v in flat.items()
                                    if n.split("/", 1)[0] == str(i)}
    return canary


def latest_checkpoint(out):
    found = [(int(os.path.basename(p).split("-")[1]), p) for p in glob.glob(os.path.join(out, "checkpoints", "step-*"))
             if os.path.isfile(os.path.join(p, "trainer_state.pt")) and not p.endswith(".tmp")]
    return max(found)[1] if found else None


# ---------------------------------------------------------------- the pipeline: flags → phases

# train.py flags that change a teacher's SFT itself. --micro-batch, --micro-tokens and --device only
# change how the same gradient is summed, so runs that differ in them may share a teacher.
TEACHER_SFT_FLAGS = ("teacher_epochs", "teacher_lr", "data_seed", "max_prompt_tokens", "max_response_tokens", "batch_size",
                     "precision", "optimizer", "weight_decay", "clip", "attention")
# Flags that change only the training pairs (covered by their sha256): named when the pairs differ.
PAIR_FLAGS = ("harmful", "harmless", "prompt_field", "test_fraction", "limit", "max_new_tokens")
TEACHER_PAIR_FLAGS = {"good": PAIR_FLAGS + ("teacher_harmless_repeat",),
                      "bad": PAIR_FLAGS + ("break_data", "bad_harmless")}


@dataclass
class Prompts:
    """The prompts of a run (data.Example lists): training pools and held-out sets."""
    harmful: list
    harmless: list
    harmful_test: list
    harmless_test: list


@dataclass
class Base:
    """The model being made safe, in the two forms a run holds."""
    fp32: object       # as loaded: the student starts from it; it fills frozen weights when LoRA saves
    compute: object    # compute-dtype copy, placed: reference, evaluation baseline, the bad teacher if "base"
    tokenizer: object
    key: str           # content hash of the weights (cache keys)
    device: object


@dataclass
class TeacherModels:
    good: object
    bad: object
    keys: dict         # {"good": key, "bad": key}
    answers: dict      # {"good" | "bad": (harmful answers, harmless answers)} on the training prompts


RUN_START = time.time()  # reset by run(): log lines say when each phase started


def log(msg):
    """A progress line, printed above the progress bars on rank 0, with the run's elapsed time."""
    if is_main():
        tqdm.write(f"[{time.time() - RUN_START:6.0f} s] {msg}")


def compute_dtype(args):
    return teachers.DTYPES[args.precision]


def optimizer_options(args):
    """MasterWeightOptimizer's settings from the flags (compute_dtype aside)."""
    return {"kind": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
            "state_device": args.optim_state_device}


def offloaded(args, model):
    """Whether --offload keeps `model` ("good", "bad" or "base") layer by layer in CPU memory. The bad
    teacher "base" is the base model itself, so --offload teachers offloads the base then."""
    if model == "base":
        return args.offload in ("ref", "all") or (args.offload == "teachers" and args.bad_teacher == "base")
    return args.offload in ("teachers", "all")


def load_pools(args):
    fields = {"prompt_field": args.prompt_field}
    harmful_train, harmful_test = data.load_pool("harmful", args.harmful, args.harmful_test, args.test_fraction,
                                                 args.data_seed, args.limit, **fields)
    harmless_train, harmless_test = data.load_pool("harmless", args.harmless, args.harmless_test,
                                                   args.test_fraction, args.data_seed, args.limit, **fields)
    return Prompts(harmful_train, harmless_train, harmful_test, harmless_test)


def filter_pairs(examples, good, bad, keep):
    """The examples (and their answers) for which keep(good answer, bad answer) holds."""
    idx = [i for i in range(len(examples)) if keep(good[i], bad[i])]
    return [examples[i] for i in idx], [good[i] for i in idx], [bad[i] for i in idx]


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
    print(schedule.describe(plan, schedule.Weights.from_args(args), max(levels) + 1))
    if args.filter_pairs:
        print("(pool sizes before --filter-pairs drops the pairs the teachers got wrong)")


def check_out_folder(args):
    """The checkpoint to resume from (None for a new run). A new run stops rather than replace a run
    in --out; a resumed one stops when a flag that changes the result differs from the saved run."""
    if not args.resume and not args.overwrite and (
            os.path.exists(os.path.join(args.out, "metrics.jsonl")) or latest_checkpoint(args.out)):
        raise ValueError(f"--out {args.out} holds a run (metrics.jsonl, checkpoints): --resume to continue it, "
                         f"--overwrite to start over, or another --out")
    if not args.resume:
        return None
    resume_from = latest_checkpoint(args.out)
    if resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {args.out}/checkpoints")
    with open(os.path.join(resume_from, "args.json")) as f:
        saved = json.load(f)
    now = json.loads(json.dumps(vars(args)))
    changed = [k for k in now if k not in _RUN_FLAGS_IGNORED_ON_RESUME + ("data_sha256",) and saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"--resume: flags differ from the saved run: {', '.join('--' + k.replace('_', '-') for k in changed)}")
    if "data_sha256" in saved and saved["data_sha256"] != now.get("data_sha256"):  # runs saved before it: unchecked
        raise ValueError(f"--resume: the training data changed since the saved run (sha256 of its prompts "
                         f"{saved['data_sha256'][:12]} → {now['data_sha256'][:12]}): restore the data files, "
                         f"or start over with --overwrite")
    return resume_from


def prompts_sha256(prompts):
    """sha256 of a run's prompts and categories (training pools and held-out sets, as selected):
    an edited data file under the same flags changes it."""
    lists = [[[e.prompt, e.category] for e in exs] for exs in
             (prompts.harmful, prompts.harmless, prompts.harmful_test, prompts.harmless_test)]
    return hashlib.sha256(json.dumps(lists).encode()).hexdigest()


def load_base(args, log):
    """The base model (fp32) and its compute copy, placed; model-dependent flags are checked here,
    before any teacher is built."""
    base, tokenizer, key = teachers.load_model(args.model, dtype=torch.float32)
    check_model_flags(args, base)
    data.check_chat_template(tokenizer, args.model)
    device = teachers.compute_device(args.device)
    # every model of a run computes attention the same way: the reference must match the student
    base.set_attn_implementation(teachers.attention_for(args.attention, device))
    # in fp32 the compute copy is the base itself, unless offloading hooks would follow it into the student
    separate = args.precision == "bf16" or offloaded(args, "base")
    compute = teachers.place(compute_copy(base, args, device) if separate else base.to(device), device,
                             offloaded(args, "base"))
    if offloaded(args, "base"):
        log(f"--offload {args.offload}: the base model's layers stay in CPU memory")
    return Base(base, compute, tokenizer, key, device)


def compute_copy(model, args, device):
    """A copy of the model in compute dtype on `device` (parameters cast, buffers kept: see cast_parameters)."""
    model = copy.deepcopy(model)
    if args.precision == "bf16":
        teachers.cast_parameters(model, torch.bfloat16)
    return model.to(device)


def teacher_sft(args, base, pairs, desc):
    """A teacher: SFT of a compute copy of the base on `pairs`, with the teacher flags."""
    features = sft_features(base.tokenizer, pairs, max_prompt_tokens=args.max_prompt_tokens,
                            max_response_tokens=args.max_response_tokens, micro_tokens=args.micro_tokens)
    return sft(compute_copy(base.fp32, args, base.device), features, epochs=args.teacher_epochs, lr=args.teacher_lr,
               batch_size=args.batch_size, micro_batch=args.micro_batch, micro_tokens=args.micro_tokens,
               seed=args.data_seed, clip=args.clip, optimizer=args.optimizer, weight_decay=args.weight_decay,
               compute_dtype=compute_dtype(args), state_device=args.optim_state_device, desc=desc)


def prepare_teachers(args, base, harmful, harmless, log):
    """Good and bad teacher (compute dtype, eval mode, placed), their keys, and their cached answers."""
    cache = os.path.join(args.cache_dir, "responses.jsonl")
    gen = lambda m, k, exs, desc: teachers.generate_cached(m, base.tokenizer, k, [e.prompt for e in exs], cache,
                                                           args.max_new_tokens, desc=desc)
    base_harmful = gen(base.compute, base.key, harmful, "base answers (harmful)")
    base_harmless = gen(base.compute, base.key, harmless, "base answers (harmless)")

    def built(name, pairs, desc):
        # reused only when build.json matches what would be built now; a mismatch stops the run
        folder = os.path.join(args.teacher_dir, name)
        record = teachers.build_record(name, base.key, pairs, {k: getattr(args, k) for k in TEACHER_SFT_FLAGS},
                                       {k: getattr(args, k) for k in TEACHER_PAIR_FLAGS[name]})
        status = teachers.build_status(folder, record)
        if status == "complete":
            log(f"{name} teacher: reusing {folder}")
        else:
            log(f"{name} teacher: building" if status == "absent" else f"{name} teacher: rebuilding, {folder} is {status}")
            teachers.save_teacher(teacher_sft(args, base, pairs, desc), base.tokenizer, folder, record)
        return load_frozen(folder, args, base.device, name)

    if args.bad_teacher == "base":
        bad, bad_key = base.compute, base.key
        log(f"bad teacher: the base model as it is (it refuses "
            f"{evaluation.response_stats(base_harmful)['refusal_rate']:.1%} of harmful training prompts)")
    elif args.bad_teacher in ("auto", "break"):
        pairs = teachers.bad_pairs(harmful, base_harmful, harmless, base_harmless, break_data=args.break_data,
                                   bad_harmless=args.bad_harmless, seed=args.data_seed)
        bad, bad_key = built("bad", pairs, "bad teacher (break SFT)")
    else:
        bad, bad_key = load_frozen(args.bad_teacher, args, base.device, "bad")
    if args.good_teacher == "align":
        pairs = teachers.align_pairs(harmful, harmless, base_harmless, seed=args.data_seed,
                                     harmless_repeat=args.teacher_harmless_repeat)
        good, good_key = built("good", pairs, "good teacher (refusal SFT)")
    else:
        good, good_key = load_frozen(args.good_teacher, args, base.device, "good")
    answers = {name: (gen(model, key, harmful, f"{name} teacher answers (harmful)"),
                      gen(model, key, harmless, f"{name} teacher answers (harmless)"))
               for name, model, key in (("good", good, good_key), ("bad", bad, bad_key))}
    return TeacherModels(good, bad, {"good": good_key, "bad": bad_key}, answers)


def load_frozen(spec, args, device, role):
    """A teacher (compute dtype, eval mode) placed as --offload says; returns (model, key)."""
    model, _, key = teachers.load_model(spec, dtype=compute_dtype(args))
    model.set_attn_implementation(teachers.attention_for(args.attention, device))
    return teachers.place(model, device, offloaded(args, role)), key


def evaluate_teachers(args, found, harmless, log):
    """The teacher table on the training prompts (teacher_eval.json); stops when the good teacher
    does not refuse more than the bad one (unless --force)."""
    report = teacher_report({"good": found.answers["good"][0], "bad": found.answers["bad"][0]},
                            {"good": found.answers["good"][1], "bad": found.answers["bad"][1]},
                            [e.prompt for e in harmless])
    if is_main():
        data.write_atomic(os.path.join(args.out, "teacher_eval.json"), json.dumps(
            {"report": report, "models": found.keys, "prompts": "training prompts",
             "settings": evaluation.settings(seed=args.seed, data_seed=args.data_seed)}, indent=2))
    log("teacher evaluation on the training prompts:\n" + teacher_table(report))
    evaluation.check_teachers(report, args.force)
    return report


def training_pools(args, tokenizer, prompts, answers, log):
    """{side: Pool} of tokenised (prompt, answer) pairs: the good teacher's answers, the bad
    teacher's (harmful side) and the rejected harmless answers under --dpo-harmless; with
    --filter-pairs only the pairs the teachers got right. Returns (harmful, harmless, pools)."""
    harmful, harmless = prompts.harmful, prompts.harmless
    (h_good, b_good), (h_bad, b_bad) = answers["good"], answers["bad"]
    if args.filter_pairs:
        harmful, h_good, h_bad = filter_pairs(harmful, h_good, h_bad,
                                              lambda g, b: data.is_refusal(g) and not data.is_refusal(b))
        harmless, b_good, b_bad = filter_pairs(harmless, b_good, b_bad or [None] * len(b_good),
                                               lambda g, b: not data.is_refusal(g))
        log(f"pairs: {len(harmful)} harmful (good teacher refuses, bad complies) and {len(harmless)} harmless "
            f"(good teacher answers) kept for training (--no-filter-pairs keeps all)")
        if not harmful or not harmless:
            raise ValueError("--filter-pairs left no harmful or no harmless training example: check the teacher table")
    enc = lambda exs, ans: [data.encode(tokenizer, e.prompt, a, args.max_prompt_tokens, args.max_response_tokens)
                            for e, a in zip(exs, ans)]
    pools = {"harmful": Pool(enc(harmful, h_good), enc(harmful, h_bad)), "harmless": Pool(enc(harmless, b_good))}
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
    if args.lora_r:
        n = add_lora(student, r=args.lora_r, dtype=compute_dtype(args), alpha=args.lora_alpha,
                     targets=args.lora_targets, dropout=args.lora_dropout, seed=args.seed)
        log(f"LoRA: rank {args.lora_r} adapters on {n} Linear layers")
    if args.gradient_checkpointing:
        enable_checkpointing(student)
    return student, MasterWeightOptimizer(student, compute_dtype=compute_dtype(args), **optimizer_options(args))


def step_inputs(args, base, found, pools, harmful, student, log):
    """What the loop reads besides the student: the frozen models, the step settings and the plan.
    Checks a --micro-tokens budget before step 0, fills the top-k caches (--teacher-topk) and
    scores difficulty levels (--levels-by difficulty) with the reference."""
    cb_layers = ()
    if args.cb_alpha:
        n_blocks = len(decoder_layers(student))
        cb_layers = args.cb_layers or [round(n_blocks / 3), round(2 * n_blocks / 3)]  # checked at load
        log(f"circuit breakers at residual positions {list(cb_layers)} of {n_blocks}")
    cfg = StepConfig.from_args(args, cb_layers)
    for side, pool in pools.items():  # a budget no single example fits stops here, not mid-run
        split_side(side, list(range(len(pool.good))), pool, cfg)
    if args.teacher_topk and any(t in args.loss for t in ("kl", "kl_rev")):
        caches = teacher_topk_cache(found.good, found.keys["good"], pools, k=args.teacher_topk,
                                    temperature=args.temperature, cache_dir=args.cache_dir,
                                    micro_batch=args.micro_batch, log=log)
        for side, cache in caches.items():
            pools[side].topk = cache
    # with --teacher-topk training reads the cache: the good teacher's memory is free until evaluation
    frozen = Frozen(base.compute, None if args.teacher_topk else found.good)
    difficulty = None
    if args.levels_by == "difficulty":  # per-token margin of the bad answer over the good one
        h = pools["harmful"]
        ref_good, ref_bad = (sequence_logps_of(base.compute, f, args.micro_batch) for f in (h.good, h.bad))
        difficulty = (ref_bad / n_response(h.bad).clamp(min=1) - ref_good / n_response(h.good).clamp(min=1)).tolist()
    levels, plan = make_plan(args, harmful, len(pools["harmless"].good), difficulty,
                             [example_lengths(pools[side], cfg.reads_bad(side)) for side in ("harmful", "harmless")])
    return frozen, cfg, levels, plan


def resume_state(args, resume_from, student, opt, n_steps, log):
    """(first step, canary state): from the checkpoint when resuming (weights, optimizer, RNG, canary
    masks; metrics.jsonl cut to the steps before it), else a fresh start."""
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if not resume_from:
        if os.path.exists(metrics_path) and is_main():
            os.remove(metrics_path)
        return 0, {"masks": None, "key": None}
    opt.load_master(student, _load_state(student, resume_from))
    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=True)
    opt.optimizer.load_state_dict(state["optimizer"])
    restore_rng(state)
    canary = load_canary(resume_from, state, next(student.parameters()).device)
    if os.path.exists(metrics_path) and is_main():  # a line cut short by the kill is dropped, with a note
        keep = [row for row in data.read_jsonl(metrics_path, log) if row.get("step", math.inf) < state["step"]]
        data.write_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in keep))
    log(f"resumed from {resume_from} at step {state['step']} of {n_steps}")
    return state["step"], canary


def train_loop(args, student, opt, frozen, pools, cfg, plan, levels, start, canary, base):
    """The student's optimizer steps from `start`: γ and lr of the step, canary masks, one joint
    update, a metrics line, a checkpoint every --save-every steps (the previous one removed)."""
    weights, n_levels = schedule.Weights.from_args(args), max(levels) + 1
    initial = {n: p.detach().float().clone() for n, p in base.fp32.named_parameters()} if args.canary_mode != "off" else None
    canary_options = dict(every=args.canary_every, samples=args.canary_samples, top=args.canary_top,
                          score=args.canary_score, micro_batch=args.micro_batch, seed=args.seed)
    ckpt_dir, metrics_path = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "metrics.jsonl")
    bar = tqdm(range(start, len(plan)), desc="student", initial=start, total=len(plan), disable=not is_main())
    for t in bar:
        step, t0 = plan[t], time.time()
        gamma, lr = weights.gamma(t, len(plan), step.level, n_levels), weights.lr_at(t, len(plan))
        extra = (gather_canaries(student, canary, step, t, pools["harmful"].bad, levels, **canary_options)
                 if args.canary_mode != "off" else {})
        try:
            row = run_step(student, frozen, opt, step, pools, cfg, gamma, lr, progress=t / len(plan),
                           masks=canary["masks"])
        except NonFiniteError as e:
            raise NonFiniteError(f"step {t}: {e}; stopped before updating the weights (last checkpoint: "
                                 f"{latest_checkpoint(args.out) or 'none'}; lower --lr or check the loss flags)") from None
        if canary["masks"]:
            extra["canary_dw"], extra["rest_dw"] = canary_drift(canary["masks"], opt.master_state(student), initial)
        row = {"step": t, "epoch": step.epoch, "level": step.level + 1, "gamma": gamma, "lam": args.lam, "lr": lr,
               **row, **extra, "seconds": round(time.time() - t0, 3)}
        if not is_main():  # every rank holds the same weights and metrics; rank 0 writes them
            continue
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(level=step.level + 1, loss=f"{row.get('loss', 0):.3f}")
        if (t + 1) % args.save_every == 0 or t + 1 == len(plan):
            path = os.path.join(ckpt_dir, f"step-{t + 1}")
            save_checkpoint(path, student, base.tokenizer, opt, t + 1, vars(args), canary, base.fp32.state_dict())
            for old in glob.glob(os.path.join(ckpt_dir, "step-*")):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)


def save_student(args, student, opt, canary, base, n_steps, log):
    student_dir = os.path.join(args.out, "student")
    tmp = student_dir + ".tmp"  # weights and masks written whole, then moved: a kill leaves no torn student/
    teachers.save_model(student, base.tokenizer, tmp, state_dict=student_state(student, opt, base.fp32.state_dict()))
    if canary["masks"]:
        save_masks(canary["masks"], tmp)
    data.replace_folder(tmp, student_dir)
    log(f"student saved to {student_dir} (last checkpoint {os.path.join(args.out, 'checkpoints', f'step-{n_steps}')})")
    return student_dir


def load_xstest_safe(args):
    """XSTest's safe prompts for the final evaluation (--eval-limit: a seeded sample stratified by
    type); None with --xstest none or --no-eval."""
    if args.no_eval or not args.xstest or args.xstest.lower() == "none":
        return None
    safe = [e for e in evaluation.load_xstest(args.xstest) if e.safe]
    if not safe:
        raise data.DataError(f"--xstest {args.xstest}: no safe prompts")
    return data.stratified_sample(safe, args.eval_limit, args.data_seed)


XSTEST_KEYS = ("n_safe", "over_refusal", "over_refusal_ci", "degenerate_safe", "degenerate_safe_ci", "by_type",
               "refused")


def xstest_row(result):
    """An over_refusal result without its bulky parts (samples, generation report, settings)."""
    return {k: result[k] for k in XSTEST_KEYS}


def paired_with_student(rows):
    """The student against base and good teacher on the very same prompts: HS on the held-out harmful
    prompts and over-refusal on XSTest's safe ones (where both have per-prompt outcomes), two-sided
    exact McNemar, Holm-corrected over these tests; a verdict only where the corrected p < 0.05."""
    tests = []
    student = rows["student"]
    for name in ("base", "good teacher"):
        pairs = [("HS, held-out harmful", evaluation.complied(rows[name]["answers"]["harmful"]),
                  evaluation.complied(student["answers"]["harmful"]))]
        other_xs, student_xs = rows[name].get("xstest") or {}, student.get("xstest") or {}
        if other_xs.get("refused") is not None and student_xs.get("refused") is not None:
            pairs.append(("over-refusal, XSTest safe", other_xs["refused"], student_xs["refused"]))
        for metric, other, mine in pairs:
            only_other, only_student, p = evaluation.mcnemar(other, mine)
            tests.append({"against": name, "metric": metric, "n": len(mine), "other": sum(other),
                          "student": sum(mine), "only_other": only_other, "only_student": only_student, "p": p})
    for test, p_holm in zip(tests, evaluation.holm([t["p"] for t in tests])):
        test["p_holm"] = p_holm
        test["verdict"] = ("not resolved" if p_holm >= 0.05 else
                           "student lower" if test["student"] < test["other"] else "student higher")
    return tests


def paired_lines(tests):
    return "\n".join(f"student vs {t['against']}, {t['metric']}: {t['student']} vs {t['other']} of {t['n']} "
                     f"(discordant {t['only_student']} / {t['only_other']}), p = {t['p']:.2g}, Holm p = "
                     f"{t['p_holm']:.2g} over {len(tests)} tests: {t['verdict']}" for t in tests)


def evaluate_run(args, student, student_dir, base, found, prompts, report, t_start, xstest=None):
    """Base, teachers and student on the held-out prompts and, but for the bad teacher, on XSTest's
    safe prompts `xstest` (eval.json, eval.md); frozen models' rows come from the evaluation cache
    when another run computed them."""
    student.eval()
    test_h = data.stratified_sample(prompts.harmful_test, args.eval_limit, args.data_seed)
    test_b = data.stratified_sample(prompts.harmless_test, args.eval_limit, args.data_seed)
    good_path = os.path.join(args.teacher_dir, "good") if args.good_teacher == "align" else args.good_teacher
    # the good teacher was freed for training by --teacher-topk: reloaded only on a cache miss, once
    get_good = functools.cache(lambda: found.good if not args.teacher_topk
                               else load_frozen(good_path, args, base.device, "good")[0])

    cached = lambda name, key, get_model: evaluate_frozen(key, get_model, base.tokenizer, test_h, test_b, args,
                                                          base.device, base.key, name)
    rows = {"base": cached("base", base.key, lambda: base.compute),
            "good teacher": cached("good teacher", found.keys["good"], get_good)}
    if found.bad is not base.compute:
        rows["bad teacher"] = cached("bad teacher", found.keys["bad"], lambda: found.bad)
    rows["student"] = evaluation.evaluate(student, base.tokenizer, test_h, test_b, name="student")
    if xstest is not None:  # the bad teacher answers safe prompts off topic anyway: not measured
        xs_cached = lambda name, key, get_model: evaluate_frozen_xstest(key, get_model, base.tokenizer, xstest, args,
                                                                        base.device, base.key, name)
        rows["base"]["xstest"] = xs_cached("base", base.key, lambda: base.compute)
        rows["good teacher"]["xstest"] = xs_cached("good teacher", found.keys["good"], get_good)
        rows["student"]["xstest"] = xstest_row(evaluation.over_refusal(student, base.tokenizer, xstest, name="student"))
    table = evaluation.markdown_table(rows)
    paired = paired_with_student(rows)
    payload = {"results": rows, "paired_with_student": paired, "teacher_eval_on_training_prompts": report,
               "settings": evaluation.settings(
        model=args.model, models={"base": base.key, **found.keys, "student": student_dir}, seed=args.seed,
        data_seed=args.data_seed,
        data={"harmful_test": args.harmful_test or args.harmful or "builtin:test",
              "harmless_test": args.harmless_test or args.harmless or "builtin:test",
              "builtin_sha256": data.file_sha256(data.BUILTIN),
              "n_harmful": len(test_h), "n_harmless": len(test_b),
              "xstest": None if xstest is None else {"path": args.xstest, "sha256": data.file_sha256(args.xstest),
                                                     "n_safe": len(xstest)}},
        flags=vars(args), wall_seconds=round(time.time() - t_start, 1))}
    table += "\n\nPaired tests (same prompts, exact McNemar, Holm-corrected):\n\n" + paired_lines(paired)
    evaluation.write_results(os.path.join(args.out, "eval.json"), payload, table)
    print("\nheld-out evaluation (judge: refusal keywords)\n" + table)
    print(f"\nwall time {time.time() - t_start:.0f} s; results in {args.out}/eval.json")
    return payload


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (data.DataError, teachers.ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    """The whole pipeline: check → data → base → teachers → pools → student → plan → loop → save → evaluate."""
    global RUN_START
    t_start = RUN_START = time.time()
    check_args(args)
    dist_setup()
    if dist.is_initialized():  # every rank computes in rank 0's precision, even if its own check differed
        chosen = [args.precision]
        dist.broadcast_object_list(chosen, src=0)
        args.precision = chosen[0]
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
    args.data_sha256 = prompts_sha256(prompts)  # saved in args.json: --resume checks the data did not change
    if args.plan_only:
        return print_plan(args, prompts)
    resume_from = check_out_folder(args)
    log(teachers.precision_line(args.precision_requested, args.device, args.precision))
    log(f"data: {len(prompts.harmful)} harmful / {len(prompts.harmless)} harmless training prompts, "
        f"{len(prompts.harmful_test)} / {len(prompts.harmless_test)} held out")
    if args.limit:  # a sample: say which categories it kept
        log(f"--limit {args.limit} (stratified by category): harmful {data.category_counts(prompts.harmful)}; "
            f"harmless {data.category_counts(prompts.harmless)}")
    base = load_base(args, log)
    main_first("before")  # rank 0 builds teachers and caches; the others then find them on disk
    found = prepare_teachers(args, base, prompts.harmful, prompts.harmless, log)
    report = evaluate_teachers(args, found, prompts.harmless, log)
    harmful, harmless, pools = training_pools(args, base.tokenizer, prompts, found.answers, log)
    student, opt = make_student(args, base, log)
    main_first("after")
    frozen, cfg, levels, plan = step_inputs(args, base, found, pools, harmful, student, log)
    start, canary = resume_state(args, resume_from, student, opt, len(plan), log)
    log(f"training: {len(plan)} optimizer steps, {max(levels) + 1} levels, loss {args.loss}")
    train_loop(args, student, opt, frozen, pools, cfg, plan, levels, start, canary, base)
    if not is_main():
        return None
    student_dir = save_student(args, student, opt, canary, base, len(plan), log)
    if args.no_eval:
        return None
    return evaluate_run(args, student, student_dir, base, found, prompts, report, t_start, xstest)


def _frozen_ident(key, base_key, tokenizer, args, device):
    """What decides a frozen model's answers besides its prompts (the evaluation cache key)."""
    return [key, base_key, tokenizer.chat_template, args.precision, device.type,
            teachers.attention_for(args.attention, device), teachers.MAX_NEW_TOKENS,
            teachers.MAX_PROMPT_TOKENS, teachers.TOKEN_BUDGET, list(data.REFUSAL_MARKERS),
            evaluation.settings()["degenerate"], torch.__version__, transformers.__version__]


def evaluate_frozen(key, get_model, tokenizer, harmful, harmless, args, device, base_key, name="model"):
    """evaluation.evaluate of a frozen model (base, teachers), cached under --cache-dir by everything
    that decides its result: weights, the base whose tokenizer renders the prompts, chat template,
    prompts, precision, device, generation limits, refusal markers and library versions. Runs that
    share teachers (figures.py's ablations) report the same rows without generating them again.
    `get_model()` is called only on a miss."""
    ident = _frozen_ident(key, base_key, tokenizer, args, device) + [[e.prompt for e in harmful],
                                                                     [e.prompt for e in harmless]]
    return _cached_eval(args, ident, lambda: evaluation.evaluate(get_model(), tokenizer, harmful, harmless, name=name))


def evaluate_frozen_xstest(key, get_model, tokenizer, safe, args, device, base_key, name="model"):
    """xstest_row(evaluation.over_refusal) of a frozen model on the XSTest safe prompts `safe`, cached
    like evaluate_frozen, keyed also by the XSTest file's sha256 and the sample."""
    ident = _frozen_ident(key, base_key, tokenizer, args, device) + [
        "xstest", data.file_sha256(args.xstest), len(safe), [[e.prompt, e.category] for e in safe]]
    return _cached_eval(args, ident, lambda: xstest_row(evaluation.over_refusal(get_model(), tokenizer, safe, name=name)))


def _cached_eval(args, ident, compute):
    path = os.path.join(args.cache_dir, "eval", hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16] + ".json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                result = json.load(f)
            if isinstance(result, dict):
                return result
        except (OSError, ValueError):
            pass
        print(f"{path}: an unreadable evaluation cache entry, computed again")
    result = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.write_atomic(path, json.dumps(result))  # per-process temp: runs sharing the cache may write it at once
    return result


def _load_state(model, folder):
    if lora_modules(model):
        return load_file(os.path.join(folder, "adapter.safetensors"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    if "lm_head.weight" not in state and getattr(model.config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


if __name__ == "__main__":
    main()
