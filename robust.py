"""Robustness mechanisms that act on the student's weights or activations rather than on a loss:
latent adversarial training (LAT: a perturbation of the residual stream found per batch) and canary
parameters (the entries most salient to harmful answers, focused on, protected or monitored).
Circuit breakers are loss terms (losses.TERMS)."""
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import data
import losses
import optim
import parallel
import schedule


# ---------------------------------------------------------------- LAT: perturbing the residual stream

def _add_to_output(delta):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype),) + tuple(output[1:])
        return output + delta.to(output.dtype)
    return hook



def residual_perturbation(model, deltas):
    """A context that adds deltas[l] ([B, T, H]) to the residual stream at position l (see
    optim.residual_module) in every forward inside it."""
    return optim.hooks([(optim.residual_module(model, l), _add_to_output(delta)) for l, delta in deltas.items()])



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
            logits, labels = optim.forward(model, feats)
        logps = losses.sequence_logps(logits, labels)
        objective = logps[:n_good].sum() - logps[n_good:].sum()  # minimised: the attacker's goal
        grads = torch.autograd.grad(objective, list(deltas.values()))
        with torch.no_grad():
            for delta, g in zip(deltas.values(), grads):
                delta -= step_size * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                delta *= (eps / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
    return {l: d.detach() for l, d in deltas.items()}


# ---------------------------------------------------------------- canary parameters

def canary_scores(model, feats, micro_batch, method="saliency"):
    """Per-entry score of every weight matrix: saliency |w · ∂L/∂w| with L the NLL of the bad
    teacher's answers on harmful prompts, or Wanda's |w|·‖x‖ (see wanda_scores)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    if method == "wanda":
        return wanda_scores(model, params, feats, micro_batch)
    model.zero_grad(set_to_none=True)
    tokens = float(optim.n_response(feats).sum())
    for part in schedule.chunks(feats, micro_batch):
        logits, labels = optim.forward(model, part)
        (-losses.sequence_logps(logits, labels).sum() / tokens).backward()
    scores = {n: (p.detach().float() * p.grad.float()).abs() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return scores


def wanda_scores(model, params, feats, micro_batch):
    """Wanda's |w|·‖x‖ of every Linear weight in `params`: ‖x‖ the L2 norm of each input feature over
    the non-padding tokens of `feats` (other matrices get no score)."""
    by_weight = {id(p): n for n, p in params.items()}
    device = next(model.parameters()).device
    sq, real = {}, {}

    def hook_for(name):
        def hook(mod, inputs, output):
            x, mask = inputs[0].detach().float(), real["mask"]
            if x.shape[:-1] == mask.shape:
                x = x[mask]
            elif x.ndim == 2 and x.shape[0] == mask.numel():
                x = x[mask.flatten()]
            else:  # e.g. MoE experts see routed token subsets: which rows are padding is unknown
                raise ValueError(f"--canary-score wanda: {name} sees input {tuple(x.shape)}, not one row "
                                 f"per token of the {tuple(mask.shape)} batch")
            sq[name] = sq.get(name, 0) + (x * x).sum(0)  # only real tokens: padding would scale ‖x‖ with width
        return hook

    linears = [(m, hook_for(by_weight[id(m.weight)])) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and id(m.weight) in by_weight]
    with optim.hooks(linears), torch.no_grad():
        for part in schedule.chunks(feats, micro_batch):
            batch = data.collate(part, model.config.pad_token_id or 0)
            mask = batch["attention_mask"].to(device)
            real["mask"] = mask.bool()
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
    # a sharded weight (--fsdp) holds whole rows, and ‖x‖ runs along them: each rank scales its own rows
    return {n: parallel.rowwise(params[n].detach().float().abs(), lambda w: w * sq[n].sqrt()[None, :]) for n in sq}


def canary_masks(scores, fraction):
    """Per tensor, the top `fraction` of entries by score (at least one) as a bool mask. A sharded score
    (--fsdp) is ranked whole, one tensor at a time, and its mask sharded like it."""
    masks = {}
    for name, score in scores.items():
        whole = parallel.whole(score)
        k = max(1, round(whole.numel() * fraction))
        flat = torch.zeros(whole.numel(), dtype=torch.bool, device=whole.device)
        flat[whole.flatten().topk(k).indices] = True
        masks[name] = parallel.shard_like(flat.view_as(whole), score)
    return masks


def n_true(masks):
    """Entries set in a dict of bool masks, over all ranks' parts when they are sharded: one reduction
    for the dict (int() of a sharded sum would read this rank's part only)."""
    local = sum(int(optim.local_part(m).sum()) for m in masks.values())
    return int(parallel.sum_over_ranks({"n": local})["n"]) if any(map(parallel.is_dtensor, masks.values())) else local


def jaccard(a, b):
    inter = n_true({n: a[n] & b[n] for n in a if n in b})
    union = n_true(a) + n_true(b) - inter
    return inter / max(union, 1)


def canary_drift(masks, model_state, initial):
    """Mean |w − w₀| on canary entries and on the rest (w₀: the initial student). Under --fsdp, `initial`
    holds this rank's parts (initial_parts) and the sums are taken over the ranks."""
    sums, sharded = {"on": 0.0, "n_on": 0, "off": 0.0, "n_off": 0}, False
    for name, w in model_state.items():
        if name not in initial:
            continue
        sharded |= parallel.is_dtensor(w)
        w = optim.local_part(w)
        d = (w.detach().float() - initial[name].to(w.device, torch.float32)).abs()
        m = masks.get(name)
        if m is not None:
            m = optim.local_part(m)
            sums["on"], sums["n_on"] = sums["on"] + float(d[m].sum()), sums["n_on"] + int(m.sum())
            sums["off"], sums["n_off"] = sums["off"] + float(d[~m].sum()), sums["n_off"] + int((~m).sum())
        else:
            sums["off"], sums["n_off"] = sums["off"] + float(d.sum()), sums["n_off"] + d.numel()
    if sharded:
        sums = parallel.sum_over_ranks(sums)
    return sums["on"] / max(sums["n_on"], 1), sums["off"] / max(sums["n_off"], 1)


def initial_parts(model, params):
    """The initial weights canary_drift compares with, where `model` holds them (under --fsdp, this rank's
    part of each, laid out as the student's parameter of that name)."""
    return {n: optim.local_part(parallel.shard_like(p.detach().float(), params[n])).clone()
            for n, p in model.named_parameters() if n in params}


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


def pinned_entries(keeps, params):
    """Entries that no computed side may move (the optimizer step's `pinned`): their value and optimizer
    state stay as they are."""
    if not keeps or any(k is None for k in keeps):
        return None
    out = []
    for i, p in enumerate(params):
        sides = [k[i] for k in keeps]
        if any(side is None for side in sides):
            out.append(None)
            continue
        pinned = torch.ones_like(p, dtype=torch.bool)
        for side in sides:
            if side is not False:
                pinned &= ~side
        out.append(pinned)
    return out


@dataclass
class CanaryState:
    """The canary masks of the current step, the scope they were scored on (`key`: an epoch, an
    (epoch, level) or a step), and the masks of levels already scored in this epoch (`store`)."""
    masks: dict = None
    key: object = None
    store: dict = field(default_factory=dict)


class CanaryOptions(NamedTuple):
    """The --canary-* flags gather_canaries reads."""
    every: str = "level"
    samples: int = 32
    top: float = 1.0
    score: str = "saliency"
    micro_batch: int = 8
    seed: int = 0


def canary_scope(step, t, levels, options):
    """The harmful examples a new set of masks is scored on: at most --canary-samples of the epoch's,
    the level's or the batch's, a seeded sample."""
    scope = list({"epoch": range(len(levels)), "level": [i for i, lv in enumerate(levels) if lv == step.level],
                  "batch": step.harmful}[options.every])
    if len(scope) > options.samples:
        pick = np.random.default_rng([options.seed, data.Seed.CANARY_SAMPLE, t]).choice(len(scope), options.samples,
                                                                                        replace=False)
        scope = [scope[i] for i in sorted(pick)]
    return scope


def gather_canaries(model, canary, step, t, bad, levels, options):
    """Sets canary.masks / canary.key for step `t`. Masks are scored once per epoch, once per
    (epoch, level), or for every harmful batch (--canary-every), on canary_scope's harmful examples
    (their bad answers `bad`). Under --sequence cyclic|mixed the levels interleave batch by batch: a
    level already scored in this epoch gets its masks back from canary.store instead of being scored
    again. Returns log fields."""
    count = lambda masks: {"canary_count": n_true(masks)} if masks else {}
    if canary.masks and canary.key is not None:
        canary.store.setdefault(canary.key, canary.masks)
    if options.every == "batch" and not step.harmful:  # no harmful batch to score: keep the masks
        return count(canary.masks)
    key = {"epoch": int(step.epoch), "level": (int(step.epoch), int(step.level)), "batch": int(t)}[options.every]
    if key in canary.store:
        canary.masks, canary.key = canary.store[key], key
        return count(canary.masks)
    scope = canary_scope(step, t, levels, options)
    was_training = model.training
    new = canary_masks(canary_scores(model, [bad[i] for i in scope], options.micro_batch, options.score),
                       options.top / 100)
    model.train(was_training)
    out = {**count(new), "canary_gathered": True}
    if canary.masks:
        out["canary_jaccard"] = jaccard(canary.masks, new)
    # only this epoch's levels can come back; every other key is seen once
    canary.store = {k: v for k, v in canary.store.items() if options.every == "level" and k[0] == step.epoch}
    canary.store[key] = new
    canary.masks, canary.key = new, key
    return out


def save_masks(masks, folder):
    """Canary masks beside the weights, so an evaluation can measure how far an attack moved them."""
    save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in masks.items()},
              os.path.join(folder, "canary_masks.safetensors"))


def whole_canary(canary):
    """The canary state with sharded masks (--fsdp) gathered whole on the CPU (every rank takes part):
    what a checkpoint or the final student saves, as one process saves it."""
    if canary is None:
        return None
    done = {}  # the current masks are also in the store: gathered once

    def gather(masks):
        if masks and id(masks) not in done:
            done[id(masks)] = {n: parallel.gather(m) for n, m in masks.items()}
        return done.get(id(masks), masks)
    return CanaryState(gather(canary.masks), canary.key, {k: gather(v) for k, v in canary.store.items()})


def save_canary(canary, folder):
    """The canary state into a checkpoint folder; returns the fields trainer_state.pt keeps (the
    current key and the keys of the stored levels, plain values: resume loads it weights_only)."""
    key = canary.key if canary is not None else None
    stored = [k for k in (canary.store if canary is not None else {}) if k != key]  # levels reused later this epoch
    if canary is not None and canary.masks:
        save_masks(canary.masks, folder)
    if stored:
        save_file({f"{i}/{n}": m.to(torch.uint8).contiguous().cpu()
                   for i, k in enumerate(stored) for n, m in canary.store[k].items()},
                  os.path.join(folder, "canary_store.safetensors"))
    return {"canary_key": key, "canary_stored": stored}


def load_canary(folder, state, params):
    """The CanaryState save_canary wrote (keys from trainer_state.pt `state`), each mask laid out as the
    parameter of its name in `params` (its device; under --fsdp, sharded like it)."""
    canary = CanaryState()
    path = os.path.join(folder, "canary_masks.safetensors")
    place = lambda masks: {n: parallel.shard_like(v.bool().to(params[n].device), params[n]) for n, v in masks.items()}
    if os.path.exists(path):
        canary.masks = place(load_file(path))
        canary.key = state["canary_key"]
        canary.store[canary.key] = canary.masks
    stored = state.get("canary_stored") or []
    if stored:
        flat = load_file(os.path.join(folder, "canary_store.safetensors"))
        for i, key in enumerate(stored):
            canary.store[key] = place({n.split("/", 1)[1]: v for n, v in flat.items() if n.split("/", 1)[0] == str(i)})
    return canary
