import math

import pytest
import torch

import losses

torch.manual_seed(0)


def brute_sequence_logps(logits, labels):
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = [float(x) for x in logits[b, t]]
            z = math.log(sum(math.exp(x) for x in row))
            total += row[y] - z
        out.append(total)
    return torch.tensor(out)


def brute_kl(p_logits, q_logits, mask, tau):
    """mean over masked positions of Σ_v p(v)(log p(v) − log q(v))."""
    values = []
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            if not mask[b, t]:
                continue
            p = [float(x) / tau for x in p_logits[b, t]]
            q = [float(x) / tau for x in q_logits[b, t]]
            zp, zq = math.log(sum(math.exp(x) for x in p)), math.log(sum(math.exp(x) for x in q))
            values.append(sum(math.exp(a - zp) * ((a - zp) - (c - zq)) for a, c in zip(p, q)))
    return sum(values) / max(len(values), 1)


def sample(B=3, T=6, V=7, dtype=torch.float32):
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100       # prompt
    labels[1, 4:] = -100       # padding
    labels[2, :] = -100        # a row with no response at all
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_loop(dtype):
    logits, labels = sample(dtype=dtype)
    got = losses.sequence_logps(logits, labels)
    want = brute_sequence_logps(logits.float(), labels)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-4)
    assert got[2] == 0


def test_response_mask_aligns_with_logits():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert losses.response_mask(labels).tolist() == [[False, True, True, False, False]]


def test_dpo_and_npo_match_formula():
    pc, pr, rc, rr = (torch.randn(5) * 4 for _ in range(4))
    beta = 0.3
    want = sum(-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for a, b, c, d in zip(pc, pr, rc, rr)) / 5
    assert math.isclose(float(losses.dpo(pc, pr, rc, rr, beta)), want, rel_tol=1e-5)
    want = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - c)))) for a, c in zip(pr, rr)) / 5
    assert math.isclose(float(losses.npo(pr, rr, beta)), want, rel_tol=1e-5)


def test_dpo_is_stable_for_huge_margins():
    big = torch.tensor([1e4])
    zero = torch.zeros(1)
    assert torch.isfinite(losses.dpo(-big, big, zero, zero))
    assert float(losses.dpo(big, -big, zero, zero)) < 1e-6


def test_simnpo_and_sft_match_formula():
    pi, n = torch.randn(4) * 10, torch.tensor([3.0, 5.0, 1.0, 8.0])
    beta, margin = 2.5, 0.5
    want = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * a / k + margin))) for a, k in zip(pi, n)) / 4
    assert math.isclose(float(losses.simnpo(pi, n, beta, margin)), want, rel_tol=1e-5)
    assert math.isclose(float(losses.sft(pi, n)), -float(pi.sum()) / float(n.sum()), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_both_directions_match_loop(dtype, tau):
    s, t = (torch.randn(3, 5, 6) * 2).to(dtype), (torch.randn(3, 5, 6) * 2).to(dtype)
    mask = torch.rand(3, 5) > 0.4
    mask[1] = False  # an empty row
    mask[0, 0] = True
    assert math.isclose(float(losses.kl(s, t, mask, tau)), brute_kl(t.float(), s.float(), mask, tau), rel_tol=1e-4)
    assert math.isclose(float(losses.kl_rev(s, t, mask, tau)), brute_kl(s.float(), t.float(), mask, tau),
                        rel_tol=1e-4)


def test_kl_of_identical_logits_is_zero_and_empty_mask_is_zero():
    s = torch.randn(2, 4, 5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert float(losses.kl(s, s.clone(), mask)) == pytest.approx(0, abs=1e-6)
    assert float(losses.kl(s, torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.bool))) == 0


def test_gradients_reach_only_the_student():
    s = torch.randn(2, 4, 5, requires_grad=True)
    t = torch.randn(2, 4, 5, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    (losses.kl(s, t, mask) + losses.kl_rev(s, t, mask)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    pi, ref = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    (losses.dpo(pi, pi * 0.5, ref, ref * 2) + losses.npo(pi, ref)).backward()
    assert pi.grad is not None and ref.grad is None
