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
