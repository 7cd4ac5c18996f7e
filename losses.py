"""Loss functions: pure functions on tensors, no model inside.

Conventions (shared by every function here):
- `logits` are [B, T, V]; `labels` are [B, T] with -100 on prompt and padding tokens.
- Logits at position t predict the token at t+1 (the usual causal shift).
- Reductions are done in fp32 whatever the input dtype, so bf16 logits are safe.
- Teacher / reference inputs are detached: gradients reach only the student's tensors.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from data import IGNORE


def response_mask(labels):
    """[B, T] bool mask aligned with logits: True at t when logits[:, t] predict a response token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


# Vocabulary-wide work (log-softmax over V = 49,152 for SmolLM2) runs on CHUNK_ROWS token positions
# at a time, in fp32, reading the bf16 logits once: no full [B, T, V] fp32 copy is made or kept for
# backward, and only response positions are computed. Backward recomputes each chunk's softmax.
# 32 rows × V × 4 bytes = 6 MiB: below glibc's mmap threshold, so a chunk's memory is reused rather
# than mapped and page-faulted anew (bench/train_step.py measures the loss phase).
CHUNK_ROWS = 32


def _row_index(mask):
    """Flat indices (rows of logits seen as [B·T, V]) of the positions where mask [B, T] is True."""
    return mask.reshape(-1).nonzero().squeeze(-1)


class _PickedLogps(torch.autograd.Function):
    """log softmax(rows[i])[targets[i]] for the selected rows, chunk by chunk (see CHUNK_ROWS)."""

    @staticmethod
    def forward(ctx, logits, index, targets):
        flat = logits.reshape(-1, logits.shape[-1])
        out, lse = (torch.empty(len(index), dtype=torch.float32, device=logits.device) for _ in range(2))
        for i in range(0, len(index), CHUNK_ROWS):
            x = flat.index_select(0, index[i:i + CHUNK_ROWS]).float()
            lse[i:i + CHUNK_ROWS] = torch.logsumexp(x, dim=-1)
            out[i:i + CHUNK_ROWS] = x.gather(-1, targets[i:i + CHUNK_ROWS, None]).squeeze(-1) - lse[i:i + CHUNK_ROWS]
        ctx.save_for_backward(logits, index, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, targets, lse = ctx.saved_tensors
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        flat, grad_flat = logits.reshape(-1, logits.shape[-1]), grad.view(-1, logits.shape[-1])
        for i in range(0, len(index), CHUNK_ROWS):
            rows, g = index[i:i + CHUNK_ROWS], grad_out[i:i + CHUNK_ROWS, None].float()
            d = (flat.index_select(0, rows).float() - lse[i:i + CHUNK_ROWS, None]).exp_().mul_(-g)  # −g·softmax
            d.scatter_add_(-1, targets[i:i + CHUNK_ROWS, None], g)                                  # +g at the target
            grad_flat.index_copy_(0, rows, d.to(grad.dtype))
        return grad, None, None


def token_logps(logits, labels):
    """log p(label_{t+1} | ≤t) for each response position, [B, T-1] fp32, 0 where ignored."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    index = _row_index(keep)
    # position (b, t) predicts labels[b, t + 1]
    flat_targets = torch.zeros(labels.numel(), dtype=torch.long, device=labels.device)
    flat_targets.view(labels.shape)[:, :-1] = labels[:, 1:]
    values = _PickedLogps.apply(logits, index, flat_targets[index].to(logits.device))
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=logits.device).index_put((index,), values)
    return out.view(labels.shape)[:, :-1]


def sequence_logps(logits, labels):
    """Σ_t log p_θ(y_t | x, y_<t) over response tokens (labels != -100) → [B]."""
    return token_logps(logits, labels).sum(-1)


def dpo(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1):
    """DPO (Rafailov et al. 2023) on sequence log-probs, mean over the batch:

        −log σ(β[(π_c − r_c) − (π_r − r_r)])
    """
    margin = (pi_chosen.float() - ref_chosen.detach().float()) - (pi_rejected.float() - ref_rejected.detach().float())
    return -F.logsigmoid(beta * margin).mean()


def npo(pi_logps, ref_logps, beta=0.1):
    """NPO (Zhang et al. 2024), mean over the batch: −(2/β) log σ(−β(π − r))."""
    ratio = pi_logps.float() - ref_logps.detach().float()
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo(pi_logps, lengths, beta=2.5, margin=0.0):
    """SimNPO (Fan et al. 2024), reference-free, length-normalised:

        −(2/β) log σ(−β · π/|y| − γ)      with γ = `margin`
    """
    avg = pi_logps.float() / lengths.float().clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * avg - margin).mean()


def sft(pi_logps, lengths):
    """Negative log-likelihood per response token, averaged over all tokens of the batch:

        −Σ_b π_b / Σ_b |y_b|
    """
    return -pi_logps.float().sum() / lengths.float().sum().clamp(min=1)


def _masked_mean(per_position, mask):
    return torch.where(mask, per_position, 0.0).sum() / mask.sum().clamp(min=1)


class _RowKL(torch.autograd.Function):
    """KL between the student's and the teacher's softmax(logits / τ) on the selected rows, chunk by
    chunk (see CHUNK_ROWS): forward KL(p_T ‖ p_S), or reverse KL(p_S ‖ p_T). Gradient reaches the
    student only:  forward  ∂/∂x = (p_S − p_T) / τ;  reverse  ∂/∂x = p_S (log p_S − log p_T − KL) / τ."""

    @staticmethod
    def forward(ctx, student, teacher, index, temperature, reverse):
        s_flat, t_flat = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        out = torch.empty(len(index), dtype=torch.float32, device=student.device)
        for i in range(0, len(index), CHUNK_ROWS):
            rows = index[i:i + CHUNK_ROWS]
            s = F.log_softmax(s_flat.index_select(0, rows).float() / temperature, dim=-1)
            t = F.log_softmax(t_flat.index_select(0, rows).float() / temperature, dim=-1)
            out[i:i + CHUNK_ROWS] = (s.exp() * (s - t)).sum(-1) if reverse else (t.exp() * (t - s)).sum(-1)
        ctx.save_for_backward(student, teacher, index, out)
        ctx.temperature, ctx.reverse = temperature, reverse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, index, kl_rows = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        s_flat, t_flat = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        grad_flat = grad.view(-1, student.shape[-1])
        for i in range(0, len(index), CHUNK_ROWS):
            rows, g = index[i:i + CHUNK_ROWS], grad_out[i:i + CHUNK_ROWS, None].float() / tau
            s = F.log_softmax(s_flat.index_select(0, rows).float() / tau, dim=-1)
            t = F.log_softmax(t_flat.index_select(0, rows).float() / tau, dim=-1)
            if ctx.reverse:
                d = s.exp().mul_(s.sub_(t).sub_(kl_rows[i:i + CHUNK_ROWS, None])).mul_(g)
            else:
                d = s.exp_().sub_(t.exp_()).mul_(g)
            grad_flat.index_copy_(0, rows, d.to(grad.dtype))
        return grad, None, None, None, None


def _row_kl_mean(student_logits, teacher_logits, mask, temperature, reverse):
    index = _row_index(mask)
    values = _RowKL.apply(student_logits, teacher_logits.detach(), index, temperature, reverse)
    per_position = torch.zeros(mask.numel(), dtype=torch.float32, device=values.device).index_put((index,), values)
    return _masked_mean(per_position.view(mask.shape), mask)


def kl(student_logits, teacher_logits, mask, temperature=1.0):
    """Forward KL(p_T ‖ p_S) per position, mean over positions where mask is True:

        Σ_v p_T(v) [log p_T(v) − log p_S(v)],   p = softmax(logits / τ), no τ² factor.
    """
    return _row_kl_mean(student_logits, teacher_logits, mask, temperature, reverse=False)


def kl_rev(student_logits, teacher_logits, mask, temperature=1.0):
    """Reverse KL(p_S ‖ p_T) per position, mean over positions where mask is True:

        Σ_v p_S(v) [log p_S(v) − log p_T(v)],   p = softmax(logits / τ), no τ² factor.
    """
    return _row_kl_mean(student_logits, teacher_logits, mask, temperature, reverse=True)


def cb_reroute(student_hidden, ref_hidden, mask):
    """Circuit-breaker rerouting (Zou et al. 2024): mean over layers and masked positions of
    ReLU(cos(h_S, h_ref)); pushes the student's representation of harmful answers off the
    reference's. Hidden states are lists (one [B, T, H] tensor per chosen layer)."""
    values = [torch.where(mask, F.relu(F.cosine_similarity(s.float(), r.detach().float(), dim=-1)), 0.0).sum()
              for s, r in zip(student_hidden, ref_hidden)]
    return torch.stack(values).sum() / (mask.sum().clamp(min=1) * len(values))


def cb_retain(student_hidden, ref_hidden, mask):
    """Circuit-breaker retain term: mean over layers and masked positions of ‖h_S − h_ref‖₂."""
    values = [torch.where(mask, (s.float() - r.detach().float()).norm(dim=-1), 0.0).sum()
              for s, r in zip(student_hidden, ref_hidden)]
    return torch.stack(values).sum() / (mask.sum().clamp(min=1) * len(values))


def _topk_buckets(student_logits, topk_ids, temperature):
    """Student log-probs on the teacher's k ids [.., k] and on the tail bucket (every other id) [..]."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = topk_ids.long()
    # the tail as logsumexp over the other ids, not log(1 − Σ p_k): no cancellation when Σ p_k ≈ 1
    tail = s.scatter(-1, ids, float("-inf")).logsumexp(-1) if ids.shape[-1] < s.shape[-1] else None
    return s.gather(-1, ids), tail


def kl_topk(student_logits, topk_ids, topk_logps, tail_logp, mask, temperature=1.0):
    """Forward KL(p_T ‖ p_S) over k+1 buckets (the teacher's top-k ids and one tail bucket for the
    rest), per position, mean over positions where mask is True:

        Σ_{v∈K} p_T(v) [log p_T(v) − log p_S(v)] + p_T(tail) [log p_T(tail) − log p_S(tail)]

    p_T(tail) = 1 − Σ_{v∈K} p_T(v) (`tail_logp` holds its log, computed from the full teacher
    distribution); p_S(tail) = 1 − Σ_{v∈K} p_S(v). `topk_logps` are the teacher's log-probs at
    temperature τ; p_S = softmax(student_logits / τ). With k = V it equals `kl`. Merging ids into
    a bucket can only lower a KL, so 0 ≤ kl_topk ≤ kl, and the gap is exactly
    p_T(tail) · KL(p_T(·|tail) ‖ p_S(·|tail)): small when the teacher is peaked (bench/topk_error.py
    measures it; docs/results.md has the numbers).
    """
    s_k, s_tail = _topk_buckets(student_logits, topk_ids, temperature)
    t_k = topk_logps.detach().float()
    per_position = (t_k.exp() * (t_k - s_k)).sum(-1)
    if s_tail is not None:
        t_tail = tail_logp.detach().float()
        per_position = per_position + t_tail.exp() * (t_tail - s_tail)
    return _masked_mean(per_position, mask)


def kl_rev_topk(student_logits, topk_ids, topk_logps, tail_logp, mask, temperature=1.0):
    """Reverse KL(p_S ‖ p_T) over the same k+1 buckets as `kl_topk`, mean over masked positions:

        Σ_{v∈K} p_S(v) [log p_S(v) − log p_T(v)] + p_S(tail) [log p_S(tail) − log p_T(tail)]

    With k = V it equals `kl_rev`; 0 ≤ kl_rev_topk ≤ kl_rev, the gap is
    p_S(tail) · KL(p_S(·|tail) ‖ p_T(·|tail)) (measured as for `kl_topk`).
    """
    s_k, s_tail = _topk_buckets(student_logits, topk_ids, temperature)
    t_k = topk_logps.detach().float()
    per_position = (s_k.exp() * (s_k - t_k)).sum(-1)
    if s_tail is not None:
        per_position = per_position + s_tail.exp() * (s_tail - tail_logp.detach().float())
    return _masked_mean(per_position, mask)


# ---------------------------------------------------------------- the terms a training step can use
# Each Term is one record: what it reads, on which sides of a step it runs, what its mean is taken
# over, and its hyperparameters (each becomes train.py's flag --NAME). Adding a term = its function
# above + one record in TERMS; train.py derives everything else from the records.

class Param(NamedTuple):
    """A term's hyperparameter: train.py's flag --NAME (dashes for underscores)."""
    default: float
    rule: str          # "> 0", "≥ 0" or "any", checked right after parsing
    help: str


class SequenceInputs(NamedTuple):
    """One micro-batch's sequence log-probs [n] (sums over response tokens), student and reference."""
    good: torch.Tensor            # the good answers (DPO's chosen, SFT's target)
    bad: torch.Tensor             # the bad / rejected answers (empty when the side reads none)
    ref_good: torch.Tensor        # the frozen reference's; None when no term reads it
    ref_bad: torch.Tensor
    good_tokens: torch.Tensor     # response lengths [n]
    bad_tokens: torch.Tensor      # None when the side reads no bad answers


class TokenInputs(NamedTuple):
    """The student's next-token logits on the good answers and the good teacher's distribution."""
    logits: torch.Tensor          # [n, K, V]
    mask: torch.Tensor            # [n, K] response positions
    teacher: torch.Tensor         # [n, K, V] teacher logits (rebuilt from the cache under --teacher-topk)
    topk: tuple = None            # (ids, logps, tail) of the cached top-k under --teacher-topk, else None


class HiddenInputs(NamedTuple):
    """Residual-stream states at the capture positions ([rows, T, H] each), student and reference."""
    student: list
    reference: list
    mask: torch.Tensor            # [rows, T] the tokens the term reads


@dataclass(frozen=True)
class Term:
    kind: str                  # "sequence" | "token" | "hidden": the inputs fn gets
    fn: Callable               # (inputs, hp) → mean over the micro-batch's `unit`; hp = {param: value}
    unit: str                  # what the mean is over: examples | good_tokens | bad_tokens | good_real_tokens
    reads: frozenset = frozenset()      # "bad" (the rejected rows), "reference" (the frozen base's forward)
    sides: tuple = ("harmful",)         # the sides of a step it runs on
    params: dict = field(default_factory=dict)   # {name: Param}
    topk_fn: Callable = None   # token terms: fn on the cached top-k; None: fn on logits rebuilt from the cache
    stats: Callable = None     # (SequenceInputs) → {name: sum over the micro-batch}, logged as TERM_name
    fade: tuple = None         # (start, end): with --cb-alpha α its weight goes α·start → α·end over training


def topk_as_logits(ids, logps, tail, vocab):
    """Teacher logits [.., V] from a cached top-k: the k log-probs at their ids and the tail's mass
    spread evenly over the other V − k ids (exact when k = V)."""
    k = ids.shape[-1]
    rest = (tail.float() - math.log(vocab - k)).unsqueeze(-1) if k < vocab else torch.zeros_like(tail).unsqueeze(-1)
    full = rest.expand(*ids.shape[:-1], vocab).clone()
    return full.scatter(-1, ids.long(), logps.float())


def _dpo_stats(s):
    margin = (s.good.detach() - s.ref_good) - (s.bad.detach() - s.ref_bad)
    return {"margin": float(margin.sum()), "accuracy": float((margin > 0).float().sum())}


BETA = Param(0.1, "> 0", "β of dpo and npo")
TEMPERATURE = Param(1.0, "> 0", "τ of kl / kl_rev")
BOTH = ("harmful", "harmless")

TERMS = {
    "dpo": Term("sequence", lambda s, hp: dpo(s.good, s.bad, s.ref_good, s.ref_bad, hp["beta"]), "examples",
                frozenset({"bad", "reference"}), BOTH, {"beta": BETA}, stats=_dpo_stats),
    "npo": Term("sequence", lambda s, hp: npo(s.bad, s.ref_bad, hp["beta"]), "examples",
                frozenset({"bad", "reference"}), params={"beta": BETA}),
    "simnpo": Term("sequence", lambda s, hp: simnpo(s.bad, s.bad_tokens, hp["simnpo_beta"], hp["simnpo_margin"]),
                   "examples", frozenset({"bad"}),
                   params={"simnpo_beta": Param(2.5, "> 0", "β of simnpo"),
                           "simnpo_margin": Param(0.0, "any", "γ (margin) of simnpo")}),
    "sft": Term("sequence", lambda s, hp: sft(s.good, s.good_tokens), "good_tokens", sides=BOTH),
    "kl": Term("token", lambda x, hp: kl(x.logits, x.teacher, x.mask, hp["temperature"]), "good_tokens",
               sides=BOTH, params={"temperature": TEMPERATURE},
               topk_fn=lambda x, hp: kl_topk(x.logits, *x.topk, x.mask, hp["temperature"])),
    "kl_rev": Term("token", lambda x, hp: kl_rev(x.logits, x.teacher, x.mask, hp["temperature"]), "good_tokens",
                   sides=BOTH, params={"temperature": TEMPERATURE},
                   topk_fn=lambda x, hp: kl_rev_topk(x.logits, *x.topk, x.mask, hp["temperature"])),
    # circuit breakers (Zou et al. 2024): reroute the bad answer's states, retain every harmless token's
    "cb": Term("hidden", lambda h, hp: cb_reroute(h.student, h.reference, h.mask), "bad_tokens",
               frozenset({"bad", "reference"}), fade=(1.0, 0.5)),
    "cb_retain": Term("hidden", lambda h, hp: cb_retain(h.student, h.reference, h.mask), "good_real_tokens",
                      frozenset({"reference"}), ("harmless",), fade=(0.0, 0.5)),
}


def term_params():
    """{name: Param} of every term's hyperparameters (a shared one once)."""
    return {name: p for term in TERMS.values() for name, p in term.params.items()}
