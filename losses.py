"""Loss functions: pure functions on tensors, no model inside.

Conventions (shared by every function here):
- `logits` are [B, T, V]; `labels` are [B, T] with -100 on prompt and padding tokens.
- Logits at position t predict the token at t+1 (the usual causal shift).
- Reductions are done in fp32 whatever the input dtype, so bf16 logits are safe.
- Teacher / reference inputs are detached: gradients reach only the student's tensors.
"""
import torch
import torch.nn.functional as F

from data import IGNORE


def response_mask(labels):
    """[B, T] bool mask aligned with logits: True at t when logits[:, t] predict a response token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def token_logps(logits, labels):
    """log p(label_{t+1} | ≤t) for each response position, [B, T-1], 0 where ignored."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(keep, logps, 0.0)  # where, not *: padded positions may hold inf/nan


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


def kl(student_logits, teacher_logits, mask, temperature=1.0):
    """Forward KL(p_T ‖ p_S) per position, mean over positions where mask is True:

        Σ_v p_T(v) [log p_T(v) − log p_S(v)],   p = softmax(logits / τ), no τ² factor.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(per_position, mask)


def kl_rev(student_logits, teacher_logits, mask, temperature=1.0):
    """Reverse KL(p_S ‖ p_T) per position, mean over positions where mask is True:

        Σ_v p_S(v) [log p_S(v) − log p_T(v)],   p = softmax(logits / τ), no τ² factor.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = (s.exp() * (s - t)).sum(-1)
    return _masked_mean(per_position, mask)


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
