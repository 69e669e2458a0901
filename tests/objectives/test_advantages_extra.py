"""The advantage estimators of advantages_extra: each against an independent float64 loop
computation, and against verl 0.9.1's own ``core_algos`` function (skipped when verl is absent)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ratiorl

torch.manual_seed(0)


@pytest.fixture(scope="module")
def verl():
    try:
        from verl.trainer.ppo import core_algos  # noqa: PLC0415  (import takes ~8 s)
    except Exception:  # noqa: BLE001
        pytest.skip("verl is not installed")
    return core_algos


def make_batch(B=12, T=7, n_groups=3, seed=0, binary=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = (torch.rand(B, generator=g) > 0.5).float() if binary else torch.randn(B, generator=g)
    gid = torch.arange(B) % n_groups
    return rewards, gid, mask


def token_rewards(rewards, mask):
    L = mask.sum(1).long()
    r = torch.zeros_like(mask)
    r[torch.arange(len(L)), L - 1] = rewards
    return r


def ref_whiten(vals):
    """verl's masked_whiten on a flat list of (value, count) in float64."""
    n = sum(c for _, c in vals)
    mean = sum(v * c for v, c in vals) / (n + 1e-8)
    var = sum((v - mean) ** 2 * c for v, c in vals) / (n + 1e-8) * n / (n - 1)
    return lambda v: (v - mean) / math.sqrt(var + 1e-8)


def groups_of(gid):
    out = {}
    for i, k in enumerate(gid.tolist()):
        out.setdefault(k, []).append(i)
    return out


# ---------------------------------------------------------------- REINFORCE++
def test_reinforce_pp_reference_and_verl(verl):
    R, gid, mask = make_batch()
    for gamma in (1.0, 0.9):
        adv = ratiorl.advantages(R, gid, method="reinforce_pp", mask=mask, gamma=gamma)
        # float64 reference: G_t = gamma^{L-1-t} R on valid tokens, whitened over valid tokens
        L = mask.sum(1).long().tolist()
        rets = [[float(R[i]) * gamma ** (L[i] - 1 - t) for t in range(L[i])] for i in range(len(L))]
        w = ref_whiten([(v, 1) for row in rets for v in row])
        for i in range(len(L)):
            for t in range(L[i]):
                assert float(adv[i, t]) == pytest.approx(w(rets[i][t]), abs=1e-5)
            assert float(adv[i, L[i]:].abs().sum()) == 0.0
        v_adv, _ = verl.compute_reinforce_plus_plus_outcome_advantage(
            token_rewards(R, mask), mask, config=SimpleNamespace(gamma=gamma))
        torch.testing.assert_close(adv, v_adv, atol=1e-5, rtol=1e-5)


def test_reinforce_pp_carries_across_masked_span(verl):
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 0]], dtype=torch.float32)
    r = torch.zeros(2, 6)
    r[0, 5], r[1, 3] = 1.0, -2.0
    adv = ratiorl.advantages(r, None, method="reinforce_pp", mask=mask, gamma=0.5)
    v_adv, _ = verl.compute_reinforce_plus_plus_outcome_advantage(r, mask, config=SimpleNamespace(gamma=0.5))
    torch.testing.assert_close(adv, v_adv, atol=1e-6, rtol=1e-6)


def test_reinforce_pp_baseline(verl):
    R, gid, mask = make_batch()
    adv = ratiorl.advantages(R, gid, method="reinforce_pp_baseline", mask=mask)
    assert adv.shape == R.shape
    groups = groups_of(gid)
    cen = {i: float(R[i]) - np.mean([float(R[j]) for j in groups[int(gid[i])]]) for i in range(len(R))}
    w = ref_whiten([(cen[i], float(mask[i].sum())) for i in range(len(R))])
    for i in range(len(R)):
        assert float(adv[i]) == pytest.approx(w(cen[i]), abs=1e-5)
    v_adv, _ = verl.compute_reinforce_plus_plus_baseline_outcome_advantage(token_rewards(R, mask), mask,
                                                                           gid.numpy())
    torch.testing.assert_close(adv[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- RLOO, OPO, GPG, ReMax
def test_rloo_matches_verl(verl):
    R, gid, mask = make_batch()
    adv = ratiorl.advantages(R, gid, method="rloo")
    v_adv, _ = verl.compute_rloo_outcome_advantage(token_rewards(R, mask), mask, gid.numpy())
    torch.testing.assert_close(adv[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)
    for i, g in enumerate(gid.tolist()):
        others = [float(R[j]) for j in groups_of(gid)[g] if j != i]
        assert float(adv[i]) == pytest.approx(float(R[i]) - np.mean(others), abs=1e-5)


def test_opo(verl):
    R, gid, mask = make_batch()
    adv = ratiorl.advantages(R.double(), gid, method="opo", mask=mask)
    L = mask.sum(1).double()
    for i, g in enumerate(gid.tolist()):
        rows = groups_of(gid)[g]
        b = sum(float(L[j] * R[j]) for j in rows) / sum(float(L[j]) for j in rows)
        assert float(adv[i]) == pytest.approx(float(R[i]) - b, abs=1e-12)
    v_adv, _ = verl.compute_opo_outcome_advantage(token_rewards(R, mask), mask, gid.numpy())
    torch.testing.assert_close(adv.float()[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)


def test_gpg(verl):
    R, gid, mask = make_batch(binary=True, seed=3)
    R[1] = 0.0
    adv = ratiorl.advantages(R, gid, method="gpg", f_norm=2.0)
    alpha = len(R) / int((R != 0).sum())
    for i, g in enumerate(gid.tolist()):
        mean = np.mean([float(R[j]) for j in groups_of(gid)[g]])
        assert float(adv[i]) == pytest.approx(alpha * (float(R[i]) - mean) / 2.0, abs=1e-6)
    v_adv, _ = verl.compute_gpg_outcome_advantage(token_rewards(R, mask), mask, gid.numpy(), f_norm=2.0)
    torch.testing.assert_close(adv[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)


def test_remax(verl):
    R, gid, mask = make_batch()
    base = torch.randn(3)[gid]
    adv = ratiorl.advantages(R, gid, method="remax", baseline=base)
    torch.testing.assert_close(adv, R - base)
    v_adv, _ = verl.compute_remax_outcome_advantage(token_rewards(R, mask), base, mask)
    torch.testing.assert_close(adv[:, None] * mask, v_adv, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="baseline"):
        ratiorl.advantages(R, gid, method="remax")


# ---------------------------------------------------------------- pass@k
def test_grpo_passk(verl):
    R, gid, mask = make_batch(seed=5)
    adv = ratiorl.advantages(R, gid, method="grpo_passk")
    for g, rows in groups_of(gid).items():
        vals = sorted((float(R[j]), j) for j in rows)
        (r2, _), (r1, j1) = vals[-2], vals[-1]
        sd = float(torch.tensor([float(R[j]) for j in rows], dtype=torch.float64).std())
        for j in rows:
            want = (r1 - r2) / (sd + 1e-6) if j == j1 else 0.0
            assert float(adv[j]) == pytest.approx(want, abs=1e-5)
    v_adv, _ = verl.compute_grpo_passk_outcome_advantage(token_rewards(R, mask), mask, gid.numpy(),
                                                         config={"norm_adv_by_std_in_grpo": True})
    torch.testing.assert_close(adv[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_passk_equals_subset_enumeration(k):
    R = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    gid = torch.arange(16) // 4
    adv = ratiorl.advantages(R, gid, method="passk", k=k)
    for g in range(4):
        rows = list(range(4 * g, 4 * g + 4))
        subsets = list(itertools.combinations(rows, k))
        val = {s: float(max(R[j] for j in s)) for s in subsets}
        mean = np.mean(list(val.values()))
        sd = math.sqrt(np.mean([(v - mean) ** 2 for v in val.values()]))
        for i in rows:
            # each response's advantage = the mean normalised pass@k advantage of the k-subsets it is in
            want = 0.0 if sd == 0 else np.mean([(val[s] - mean) / sd for s in subsets if i in s])
            assert float(adv[i]) == pytest.approx(want, abs=1e-5), (g, i, k)
    with pytest.raises(ValueError, match="k=5"):
        ratiorl.advantages(R, gid, method="passk", k=5)


# ---------------------------------------------------------------- optimal token baseline
def test_optimal_baseline(verl):
    R, gid, mask = make_batch(B=9, T=6, n_groups=3, seed=2)
    mask[3] = 1  # rows 0 and 3 (group 0) tie for the longest: no zero tail there
    logp = -torch.rand(9, 6) * mask
    spp = torch.rand(9, 6) * 0.5 * mask
    for zero_tail in (True, False):
        adv = ratiorl.advantages(R, gid, method="optimal_baseline", mask=mask, logp=logp, sum_pi_squared=spp,
                                 zero_tail=zero_tail)
        # float64 loop reference
        m = mask.double()
        L = m.sum(1).long().tolist()
        ret = torch.zeros(9, 6, dtype=torch.float64)
        for i in range(9):
            ret[i, : L[i]] = float(R[i])
        w = (1 - 2 * logp.double().exp() + spp.double()) * m
        W = w.cumsum(1) * m
        want = torch.zeros_like(ret)
        for g, rows in groups_of(gid).items():
            for t in range(6):
                num = sum(float(ret[j, t] * W[j, t]) for j in rows)
                den = sum(float(W[j, t]) for j in rows) + 1e-8
                for j in rows:
                    want[j, t] = ret[j, t] - num / den
            lens = sorted(L[j] for j in rows)
            longest = [j for j in rows if L[j] == lens[-1]]
            if zero_tail and len(longest) == 1 and lens[-1] > lens[-2]:
                j = longest[0]
                want[j, lens[-2]:] = ret[j, lens[-2]:]
        torch.testing.assert_close(adv.double(), want * m, atol=1e-5, rtol=1e-5)
        v_adv, _ = verl.compute_optimal_token_baseline_advantage(token_rewards(R, mask), mask, gid.numpy(), logp, spp,
                                                                 handle_zero_tail=zero_tail)
        torch.testing.assert_close(adv, v_adv, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GDPO
def test_gdpo_several_rewards(verl):
    _, gid, mask = make_batch(B=12, seed=4)
    g = torch.Generator().manual_seed(1)
    comps = {"accuracy": (torch.rand(12, generator=g) > 0.5).float(), "format": torch.rand(12, generator=g) * 0.2}
    weights = {"accuracy": 1.0, "format": 0.5}
    R = comps["accuracy"] + 0.5 * comps["format"]
    adv = ratiorl.advantages(R, gid, method="gdpo", mask=mask, components=comps, reward_weights=weights)
    total = {}
    for name, s in comps.items():
        for grp, rows in groups_of(gid).items():
            x = torch.tensor([float(s[j]) for j in rows], dtype=torch.float64)
            for j in rows:
                a = 0.0 if float(x.max() - x.min()) == 0 else (float(s[j]) - float(x.mean())) / (float(x.std()) + 1e-6)
                total[j] = total.get(j, 0.0) + weights[name] * a
    w = ref_whiten([(total[i], float(mask[i].sum())) for i in range(12)])
    for i in range(12):
        assert float(adv[i]) == pytest.approx(w(total[i]), abs=1e-5)
    # verl: gdpo_reward_keys / weights from the config, per-key scores in non_tensor_batch
    Tp = 3
    batch = {"prompts": torch.zeros(12, Tp), "attention_mask": torch.cat([torch.ones(12, Tp), mask], 1).long()}
    cfg = {"gdpo_reward_keys": list(comps), "gdpo_reward_weights": [weights[k] for k in comps]}
    v_adv, _ = verl.compute_gdpo_outcome_advantage(token_rewards(R, mask), mask, gid.numpy(), config=cfg,
                                                   non_tensor_batch={k: v.numpy() for k, v in comps.items()},
                                                   batch=batch)
    torch.testing.assert_close(adv[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reward components"):
        ratiorl.advantages(R, gid, method="gdpo", mask=mask, components=comps, reward_weights={"nope": 1.0})


# ---------------------------------------------------------------- multi-turn GAE
def test_gae_skip_masked_tool_spans(verl):
    B, T = 3, 10
    loss_mask = torch.ones(B, T)
    loss_mask[0, 3:6] = 0  # tool output inside the trajectory
    loss_mask[1, 2:4] = 0
    loss_mask[1, 7:] = 0  # padding
    loss_mask[2, 5:] = 0
    values = torch.randn(B, T) * loss_mask
    R = torch.tensor([1.0, -0.5, 2.0])
    for lam, gamma in ((0.95, 1.0), (0.8, 0.9)):
        adv = ratiorl.advantages(R, None, method="gae", values=values, mask=loss_mask, lam=lam, gamma=gamma,
                                 skip_masked=True)
        # float64 reference: GAE on each row's valid tokens only, as if the tool span were absent
        for i in range(B):
            pos = loss_mask[i].nonzero().flatten().tolist()
            v = [float(values[i, p]) for p in pos] + [0.0]
            r = [0.0] * len(pos)
            r[-1] = float(R[i])
            a = 0.0
            want = [0.0] * len(pos)
            for k in range(len(pos) - 1, -1, -1):
                a = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * a
                want[k] = a
            for k, p in enumerate(pos):
                assert float(adv[i, p]) == pytest.approx(want[k], abs=1e-5)
        assert float((adv * (1 - loss_mask)).abs().sum()) == 0.0
        r_tok = torch.zeros(B, T)
        for i in range(B):
            r_tok[i, int(loss_mask[i].nonzero().max())] = R[i]
        v_adv_raw = _verl_gae_unwhitened(verl, r_tok, values, loss_mask, gamma, lam)
        torch.testing.assert_close(adv, v_adv_raw * loss_mask, atol=1e-5, rtol=1e-5)
    # without gaps skip_masked changes nothing
    full = (torch.arange(T)[None, :] < torch.tensor([[4], [10], [7]])).float()
    a1 = ratiorl.advantages(R, None, method="gae", values=values * full, mask=full, skip_masked=True)
    a0 = ratiorl.advantages(R, None, method="gae", values=values * full, mask=full)
    torch.testing.assert_close(a1, a0, atol=1e-6, rtol=1e-6)


def _verl_gae_unwhitened(verl, r, values, mask, gamma, lam):
    """verl's GAE returns the whitened advantages and returns = raw advantages + values."""
    _, returns = verl.compute_gae_advantage_return(r, values, mask, gamma, lam)
    return returns - values


def test_entries_declare_capabilities():
    from ratiorl.objectives import ADVANTAGES as A  # noqa: PLC0415

    assert A["remax"].needs_greedy_baseline and A["gdpo"].needs_reward_components
    assert A["optimal_baseline"].needs_token_stats and A["reinforce_pp"].token_level
    assert all(getattr(A[n], "needs_groups", False) for n in ("opo", "gpg", "grpo_passk", "passk", "gdpo",
                                                                "reinforce_pp_baseline", "optimal_baseline"))


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_groups_of_one_match_verl_with_singleton_reward(verl, norm):
    # groups of sizes 3, 1, 2, 1: verl gives a lone completion mean 0 and std 1 (A = R / (1 + eps)),
    # ratiorl's default gives it 0; singleton="reward" (and eps=1e-6) reproduces verl
    R = torch.tensor([1.0, 0.0, 0.5, 0.7, 0.2, 0.9, -0.4])
    gid = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    mask = torch.ones(7, 3)
    v_adv, _ = verl.compute_grpo_outcome_advantage(token_rewards(R, mask), mask, gid.numpy(), epsilon=1e-6,
                                                   norm_adv_by_std_in_grpo=norm)
    method, opts = ("group_norm", {"eps": 1e-6}) if norm else ("group_mean", {})
    ours = ratiorl.advantages(R, gid, method=method, singleton="reward", **opts)
    torch.testing.assert_close(ours[:, None] * mask, v_adv, atol=1e-5, rtol=1e-5)
    default = ratiorl.advantages(R, gid, method=method, **opts)
    assert float(default[3]) == 0.0 and float(default[6]) == 0.0  # ours: no baseline, no signal
    assert float(ours[3]) == pytest.approx(0.7 / (1 + 1e-6 if norm else 1.0))
    with pytest.raises(ValueError, match="singleton"):
        ratiorl.advantages(R, gid, method=method, singleton="mean")
