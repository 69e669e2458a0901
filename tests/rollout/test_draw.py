"""``draw_from``: inverse-CDF sampling with one uniform per row."""

import torch

from ratiorl.rollout.truncation import draw_from


def test_frequencies_match_the_probabilities_and_zeros_are_never_drawn():
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 200_000
    tok = draw_from(p.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=6).double() / n
    assert freq[[0, 2, 5]].sum() == 0
    # binomial standard error sqrt(p (1 - p) / n) <= 0.0012; 5 of them
    assert torch.allclose(freq, p.double(), atol=0.006)


def test_one_uniform_per_row_a_row_draw_ignores_the_other_rows():
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(8, 50, generator=g), -1)
    b = a.clone()
    b[1:] = torch.softmax(torch.randn(7, 50, generator=g), -1)  # every row but the first changes
    ta = draw_from(a, torch.Generator().manual_seed(5))
    tb = draw_from(b, torch.Generator().manual_seed(5))
    assert ta[0] == tb[0]
    u = torch.rand((8, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cdf = a.double().cumsum(-1)
    want = (cdf <= u * cdf[:, -1:]).sum(-1)  # the number of tokens whose cumulative mass is <= u
    assert torch.equal(ta, want)


def test_a_point_mass_is_always_drawn():
    p = torch.zeros(1000, 7)
    p[:, 4] = 1.0
    assert (draw_from(p, torch.Generator().manual_seed(2)) == 4).all()
