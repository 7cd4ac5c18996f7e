
import pytest

from eval import mcnemar


def test_exact_mcnemar_against_hand_computed_binomial_tails():
    # discordant 2 vs 1: p = 2 · (C(3,0) + C(3,1)) / 2³ = 1, capped at 1
    assert mcnemar([1, 1, 0, 0, 1], [0, 0, 0, 1, 1]) == (2, 1, 1.0)
    # 24 vs 0: p = 2 / 2²⁴
    assert mcnemar([True] * 24 + [False], [False] * 25) == (24, 0, pytest.approx(2 / 2 ** 24))
    # 5 vs 1: p = 2 · (1 + 6) / 64
    assert mcnemar([1] * 5 + [0] + [1] * 4, [0] * 5 + [1] + [1] * 4)[2] == pytest.approx(14 / 64)
    assert mcnemar([1, 0], [1, 0]) == (0, 0, 1.0)


def test_mcnemar_refuses_outcomes_of_different_lengths():
    with pytest.raises(ValueError, match="different lengths: 3 and 2"):
        mcnemar([1, 0, 1], [1, 0])
