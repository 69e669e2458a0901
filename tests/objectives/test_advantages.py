"""Advantage estimators (GRPO tutorial sec. 6.1, RLOO, GAE tutorial sec. 4.2, VAPO sec. 7.3)."""

import pytest
import torch

import ratiorl
from ratiorl.objectives import ADVANTAGES

from ._reference import reference_gae

GROUP_METHODS = ["group_mean", "group_norm", "batch_norm", "rloo"]


def _groups():
    # arbitrary ids, non-contiguous, unequal sizes, a group of one
    return torch.tensor([7, 7, -3, 7, -3, 100, 42, 42, 42, 42])


def test_methods_against_per_group_loops():
    g = _groups()
    R = torch.randn(len(g), dtype=torch.float64)
    out = {m: ratiorl.advantages(R, g, method=m) for m in GROUP_METHODS + ["none"]}
    std_b = R.std()
    for i in range(len(g)):
        members = [j for j in range(len(g)) if g[j] == g[i]]
        r = R[members]
        mean = r.mean()
        assert torch.isclose(out["group_mean"][i], R[i] - mean)
        std = r.std() if len(members) > 1 else torch.tensor(0.0, dtype=R.dtype)
        assert torch.isclose(out["group_norm"][i], (R[i] - mean) / (std + 1e-4))
        assert torch.isclose(out["batch_norm"][i], (R[i] - mean) / (std_b + 1e-4))
        others = [R[j] for j in members if j != i]
        exp = R[i] - sum(others) / len(others) if others else torch.tensor(0.0, dtype=R.dtype)
        assert torch.isclose(out["rloo"][i], exp)
    assert torch.equal(out["none"], R)


@pytest.mark.parametrize("method", GROUP_METHODS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -7.3, 1e6])
def test_all_equal_group_is_exactly_zero(method, value):
    g = _groups()
    R = torch.randn(len(g))
    R[g == 42] = value  # one constant group of 4
    R[g == 100] = value + 1  # and the group of one
    A = ratiorl.advantages(R, g, method=method)
    assert torch.isfinite(A).all()
    assert (A[g == 42] == 0).all() and (A[g == 100] == 0).all()
    assert (A[g == 7] != 0).any()
    # a whole batch of equal rewards
    A = ratiorl.advantages(torch.full((6,), value), torch.tensor([0, 0, 0, 1, 1, 1]), method=method)
    assert (A == 0).all()


def test_none_has_no_baseline():
    R = torch.full((4,), 0.5)
    assert torch.equal(ratiorl.advantages(R, torch.zeros(4, dtype=torch.long), method="none"), R)


def test_group_ids_none_is_one_group():
    R = torch.randn(5)
    torch.testing.assert_close(ratiorl.advantages(R, None, method="group_mean"), R - R.mean())


def test_gae_matches_plain_loop():
    B, T = 5, 9
    values = torch.randn(B, T, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 1, 0, 7])
    mask = torch.arange(T)[None] < lengths[:, None]
    R = torch.randn(B, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)]:
        A = ratiorl.advantages(R, None, method="gae", values=values, mask=mask, gamma=gamma, lam=lam)
        ref = reference_gae(R, values.float(), mask, gamma, lam)
        torch.testing.assert_close(A.double(), ref, rtol=1e-5, atol=1e-5)
    # lam = 1, gamma = 1: A_t = R - V_t (Monte Carlo)
    A = ratiorl.advantages(R, None, method="gae", values=values, mask=mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(A.double(), ((R[:, None] - values.float().double()) * mask), rtol=1e-5, atol=1e-5)


def test_gae_length_adaptive():
    B, T = 4, 60
    values = torch.randn(B, T)
    lengths = torch.tensor([60, 30, 10, 25])
    mask = torch.arange(T)[None] < lengths[:, None]
    R = torch.randn(B)
    A = ratiorl.advantages(R, None, method="gae_length_adaptive", values=values, mask=mask, alpha=0.05)
    lam = (1 - 1 / (0.05 * lengths.float())).clamp(0, 1)
    ref = reference_gae(R, values, mask, 1.0, lam)
    torch.testing.assert_close(A.double(), ref, rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="group_norm"):
        ratiorl.advantages(torch.randn(3), None, method="nope")
    with pytest.raises(ValueError, match="rewards"):
        ratiorl.advantages(torch.tensor([1.0, float("nan")]), None)
    with pytest.raises(ValueError, match="group_ids"):
        ratiorl.advantages(torch.randn(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="values"):
        ratiorl.advantages(torch.randn(3), None, method="gae")
    assert set(ADVANTAGES) >= {"none", "group_mean", "group_norm", "batch_norm", "rloo", "gae", "gae_length_adaptive"}
