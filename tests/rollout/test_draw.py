"""``draw_from``: the exponential race (torch.multinomial) and inverse-CDF sampling."""

import pytest
import torch

from ratiorl.rollout import HFRolloutEngine
from ratiorl.rollout.truncation import INVERSE_CDF_MIN_VOCAB, draw_from


@pytest.mark.parametrize("method", ["multinomial", "inverse_cdf"])
def test_frequencies_match_the_probabilities_and_zeros_are_never_drawn(method):
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 200_000
    tok = draw_from(p.expand(n, -1).contiguous(), torch.Generator().manual_seed(0), method)
    freq = torch.bincount(tok, minlength=6).double() / n
    assert freq[[0, 2, 5]].sum() == 0
    # binomial standard error sqrt(p (1 - p) / n) <= 0.0012; 5 of them
    assert torch.allclose(freq, p.double(), atol=0.006)


def test_inverse_cdf_uses_one_uniform_per_row_and_ignores_the_other_rows():
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(8, 50, generator=g), -1)
    b = a.clone()
    b[1:] = torch.softmax(torch.randn(7, 50, generator=g), -1)  # every row but the first changes
    ta = draw_from(a, torch.Generator().manual_seed(5), "inverse_cdf")
    tb = draw_from(b, torch.Generator().manual_seed(5), "inverse_cdf")
    assert ta[0] == tb[0]
    u = torch.rand((8, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cdf = a.double().cumsum(-1)
    want = (cdf <= u * cdf[:, -1:]).sum(-1)  # the number of tokens whose cumulative mass is <= u
    assert torch.equal(ta, want)


def test_auto_is_the_race_for_small_vocabularies_and_inverse_cdf_for_large_ones():
    for V, same_as in ((100, "multinomial"), (INVERSE_CDF_MIN_VOCAB, "inverse_cdf")):
        p = torch.softmax(torch.randn(16, V, generator=torch.Generator().manual_seed(V)), -1)
        auto = draw_from(p, torch.Generator().manual_seed(3), "auto")
        assert torch.equal(auto, draw_from(p, torch.Generator().manual_seed(3), same_as))
    race = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert torch.equal(draw_from(p, torch.Generator().manual_seed(3), "multinomial"), race)


def test_a_point_mass_is_always_drawn_and_bad_methods_are_named():
    p = torch.zeros(1000, 7)
    p[:, 4] = 1.0
    for method in ("multinomial", "inverse_cdf"):
        assert (draw_from(p, torch.Generator().manual_seed(2), method) == 4).all()
    with pytest.raises(ValueError, match="draw method must be one of"):
        draw_from(p, None, "gumbel")
    with pytest.raises(ValueError, match="draw must be one of"):
        HFRolloutEngine(None, None, draw="gumbel")


@pytest.mark.parametrize("V", [7, 512, 1000, 8192, 49_152, 50_001])
def test_two_level_inverse_cdf_equals_one_cumulative_sum(V):
    """The block sums pick the same token as one float64 cumulative sum over the whole row (the
    reference below), with zeros, peaked and flat rows, and vocabularies that are not a multiple
    of the block (the last block is partial)."""
    g = torch.Generator().manual_seed(V)
    rows = []
    for scale in (0.1, 1.0, 4.0, 12.0):
        p = torch.softmax(torch.randn(48, V, generator=g) * scale, -1)
        p[:, torch.randperm(V, generator=g)[: V // 3]] = 0  # a third of the vocabulary impossible
        rows.append(p / p.sum(-1, keepdim=True))
    p = torch.cat(rows)
    u = torch.rand((p.shape[0], 1), dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    cdf = p.double().cumsum(-1)
    want = (cdf <= u * cdf[:, -1:]).sum(-1).clamp(max=V - 1)
    got = draw_from(p, torch.Generator().manual_seed(7), "inverse_cdf")
    assert torch.equal(got, want)
    assert (p.gather(1, got[:, None]) > 0).all()


def test_inverse_cdf_at_the_top_of_the_unit_interval_draws_the_last_possible_token():
    """u just below 1 lands on the last token of positive probability, never on the zeros after it
    (nor past the end), even when that token sits in an earlier block than the last."""
    from ratiorl.rollout.truncation import INVERSE_CDF_BLOCK, _inverse_cdf

    V = 3 * INVERSE_CDF_BLOCK + 5
    p = torch.zeros(3, V)
    p[0, :10] = 0.1  # the mass in the first block only
    p[1, INVERSE_CDF_BLOCK + 3] = 1.0  # a point mass in the second block
    p[2, :] = 1.0 / V  # flat, up to the partial last block
    u = torch.full((3, 1), 1.0 - 2.0**-53, dtype=torch.float64)
    assert _inverse_cdf(p, u).tolist() == [9, INVERSE_CDF_BLOCK + 3, V - 1]
    assert _inverse_cdf(p, torch.zeros(3, 1, dtype=torch.float64)).tolist() == [0, INVERSE_CDF_BLOCK + 3, 0]


def test_inverse_cdf_never_draws_a_zero_when_the_block_sums_round_above_the_running_sum():
    """A block whose float64 sum (summed in parallel lanes) exceeds its running cumulative sum (1.0
    absorbs each 1e-17 added to it one at a time): a target above the running total must still
    pick an entry of positive probability in that block, not the zero after it."""
    from ratiorl.rollout.truncation import INVERSE_CDF_BLOCK, _inverse_cdf

    B = INVERSE_CDF_BLOCK
    p = torch.zeros(1, 2 * B)
    p[0, 0], p[0, 1:B] = 1.0, 1e-17
    total = p.sum(-1, dtype=torch.float64)
    assert float(total) > 1.0  # the premise: the parallel sum keeps the small entries
    tok = int(_inverse_cdf(p, torch.full((1, 1), 1.0 - 2.0**-53, dtype=torch.float64)))
    assert 0 <= tok < B and p[0, tok] > 0
