"""Sampler/trainer mismatch correction (behaviour_logp): every level x mode against an independent
float64 computation (loss and gradient), the batch normaliser, dropped-token bookkeeping, metrics,
8192-token finiteness, the proximal policy, and bad input."""

import math
import warnings

import numpy as np
import pytest
import torch

import ratiorl
from ratiorl.objectives import MISMATCH_LEVELS, MISMATCH_MODES, mismatch

LEVELS = ["token", "cumulative", "geometric", "sequence", "self_normalized"]
MODES = ["truncate", "mask", "reject"]
SEQ_LEVELS = {"geometric", "sequence", "self_normalized"}


def make_batch(B=8, T=12, seed=0, noise=0.4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 2 - 0.05
    mu = (old + noise * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=0.0)
    logp = old + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.tensor([T, T - 3, 1, T, 0, 5, T - 1, 7][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2][:B])
    return logp, old, mu, mask, adv, group_ids


# ----------------------------------------------------------------------------- float64 reference


def ref_correction(old, mu, mask, gids, level, mode, low, high, normalize="none"):
    """(B, T) numpy float64 correction, written with loops (independent of the library)."""
    old, mu, m = old.numpy(), mu.numpy(), mask.numpy() > 0
    B, T = old.shape
    d = np.clip(old - mu, -20, 20) * m
    n = m.sum(1)
    u = d.sum(1)
    c = np.zeros((B, T))
    affected = np.zeros((B, T), bool)
    seqw = np.zeros(B)
    if level == "self_normalized":
        for i in range(B):
            if n[i] == 0:
                continue
            mates = [j for j in range(B) if gids[j] == gids[i] and n[j] > 0]
            seqw[i] = math.exp(u[i]) / np.mean([math.exp(u[j]) for j in mates])
    for i in range(B):
        if n[i] == 0:
            continue
        if level == "token":
            w = np.exp(d[i])
        elif level == "cumulative":
            w = np.exp(np.cumsum(d[i]))
        elif level == "geometric":
            w = np.full(T, math.exp(u[i] / n[i]))
        elif level == "sequence":
            w = np.full(T, math.exp(u[i]))
        else:
            w = np.full(T, seqw[i])
        inside = (w >= low) & (w <= high)
        for t in range(T):
            if not m[i, t]:
                continue
            if mode == "truncate":
                c[i, t] = min(max(w[t], low), high)
                affected[i, t] = w[t] > high or w[t] < low
            elif mode == "mask":
                c[i, t] = w[t] if inside[t] else 0.0
                affected[i, t] = not inside[t]
        if mode == "reject":
            ok = all(inside[t] for t in range(T) if m[i, t])
            for t in range(T):
                if m[i, t]:
                    c[i, t] = w[t] if ok else 0.0
                    affected[i, t] = not ok
    if normalize == "batch":
        if level in SEQ_LEVELS:
            per_seq = [c[i, 0] for i in range(B) if n[i] > 0]
            mean = np.mean(per_seq)
        else:
            mean = c[m].mean()
        c = c / mean
    return c, affected


def ref_loss(logp, old, adv, mask, c, aggregation, eps=0.2):
    """GRPO clipped surrogate times the correction, float64 torch (for the gradient)."""
    r = torch.exp(logp - old)
    A = adv[:, None]
    L = -torch.minimum(r * A, torch.clamp(r, 1 - eps, 1 + eps) * A) * torch.as_tensor(c)
    n = mask.sum(1)
    if aggregation == "token_mean":
        return (L * mask).sum() / mask.sum()
    return ((L * mask).sum(1) / n.clamp_min(1)).sum() / mask.shape[0]


DEFAULT_BAND = {"truncate": (0.0, 2.0), "mask": (0.5, 2.0), "reject": (0.5, 2.0)}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_level_mode_against_float64_reference(level, mode, aggregation):
    logp, old, mu, mask, adv, g = make_batch()
    # bands active on some tokens, not all
    low, high = (0.93, 1.03) if level == "geometric" else (0.5, 2.0) if mode == "reject" else (0.7, 1.5)
    low = 0.0 if mode == "truncate" else low
    obj = ratiorl.objective("grpo", beta=0.0, aggregation=aggregation, mismatch_level=level, mismatch_mode=mode,
                            mismatch_low=low, mismatch_high=high)
    x = logp.clone().requires_grad_(True)
    out = obj(x, old, adv, mask, group_ids=g, behaviour_logp=mu, return_details=True)
    out.loss.backward()
    c, affected = ref_correction(old, mu, mask, g.tolist(), level, mode, low, high)
    assert 0 < affected.sum() < mask.sum()
    y = logp.clone().requires_grad_(True)
    ref = ref_loss(y, old, adv, mask, c, aggregation)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    # the applied correction in details, token view
    corr = out.details.correction
    corr_tok = corr[:, None].expand_as(mask) * mask if corr.dim() == 1 else corr
    np.testing.assert_allclose(corr_tok.numpy(), c, rtol=1e-10, atol=1e-12)
    # dropped-token bookkeeping: fractions of valid tokens / non-empty sequences
    m = mask.numpy() > 0
    assert out.metrics["mismatch_token_frac"] == pytest.approx(affected[m].mean(), abs=1e-12)
    nonempty = m.any(1)
    assert out.metrics["mismatch_seq_frac"] == pytest.approx(affected.any(1)[nonempty].mean(), abs=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", MODES)
def test_batch_normaliser(level, mode):
    logp, old, mu, mask, adv, g = make_batch(seed=3)
    low, high = DEFAULT_BAND[mode]
    obj = ratiorl.objective("grpo", beta=0.0, mismatch_level=level, mismatch_mode=mode, mismatch_normalize="batch")
    x = logp.clone().requires_grad_(True)
    out = obj(x, old, adv, mask, group_ids=g, behaviour_logp=mu)
    out.loss.backward()
    c, _ = ref_correction(old, mu, mask, g.tolist(), level, mode, low, high, normalize="batch")
    y = logp.clone().requires_grad_(True)
    ref = ref_loss(y, old, adv, mask, c, "seq_mean_token_mean")
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    assert out.metrics["mismatch_applied_mean"] == pytest.approx(1.0, abs=1e-10)


def test_dropped_tokens_keep_the_normalisers():
    """Masked tokens contribute 0 but still count in N (token_mean) and |y_i| (seq_mean_token_mean)."""
    logp, old, mu, mask, adv, g = make_batch(seed=5, noise=0.8)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        obj = ratiorl.objective("grpo", beta=0.0, aggregation=agg, mismatch_level="token", mismatch_mode="mask")
        out = obj(logp, old, adv, mask, group_ids=g, behaviour_logp=mu, return_details=True)
        keep = (out.details.correction > 0).to(mask.dtype) * mask
        assert 0 < keep.sum() < mask.sum()
        base = ratiorl.objective("grpo", beta=0.0, aggregation=agg)
        c = out.details.correction
        # the same loss from an uncorrected call whose advantages carry c per token: normalisers unchanged
        ref = base(logp, old, adv[:, None] * c, mask)
        # clip regions depend on sign(A) only, and c >= 0, so -min(rA c, clip(r) A c) = c * L
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)


def test_sequence_weight_with_token_correction():
    """GSPO (sequence weight, sequence aggregation) x token TIS: L_i times the mean of c over its tokens."""
    logp, old, mu, mask, adv, g = make_batch(seed=2)
    obj = ratiorl.objective("gspo", mismatch_level="token", mismatch_high=1.2)
    out = obj(logp, old, adv, mask, group_ids=g, behaviour_logp=mu, return_details=True)
    base = ratiorl.objective("gspo")(logp, old, adv, mask, group_ids=g, return_details=True)
    c = out.details.correction
    n = mask.sum(1).clamp_min(1)
    s = base.details.weight
    eps_l, eps_h = 1 - 3e-4, 1 + 4e-4
    L = -torch.minimum(s * adv, s.clamp(eps_l, eps_h) * adv)
    ref = (L * (c * mask).sum(1) / n).sum() / mask.shape[0]
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)


def test_metrics_against_reference():
    logp, old, mu, mask, adv, g = make_batch(B=8, T=40, seed=7)
    obj = ratiorl.objective("grpo", beta=0.0, mismatch_level="token")
    out = obj(logp, old, adv, mask, group_ids=g, behaviour_logp=mu)
    m = mask.numpy() > 0
    d = (old - mu).numpy()[m]
    w = np.exp(d)
    assert out.metrics["mismatch_weight_mean"] == pytest.approx(w.mean(), rel=1e-10)
    assert out.metrics["mismatch_weight_max"] == pytest.approx(w.max(), rel=1e-10)
    assert out.metrics["mismatch_ess"] == pytest.approx(w.sum() ** 2 / (len(w) * (w * w).sum()), rel=1e-10)
    assert out.metrics["mismatch_kl_k1"] == pytest.approx((-d).mean(), rel=1e-10)
    assert out.metrics["mismatch_kl_k3"] == pytest.approx((w - 1 - d).mean(), rel=1e-10)
    pos = np.cumsum(m, 1)
    k3 = np.exp((old - mu).numpy()) - 1 - (old - mu).numpy()
    for a, b in [(1, 16), (17, 64)]:
        sel = m & (pos >= a) & (pos <= b)
        assert out.metrics[f"mismatch_k3_pos_{a}_{b}"] == pytest.approx(k3[sel].mean(), rel=1e-10)
    assert "mismatch_k3_pos_65_256" not in out.metrics  # T = 40
    # a sequence level: ESS over non-empty sequences
    out = ratiorl.objective("grpo", beta=0.0, mismatch_level="sequence", mismatch_high=1e6)(
        logp, old, adv, mask, group_ids=g, behaviour_logp=mu)
    u = ((old - mu) * mask).sum(1).numpy()[m.any(1)]
    ws = np.exp(u)
    assert out.metrics["mismatch_ess"] == pytest.approx(ws.sum() ** 2 / (len(ws) * (ws * ws).sum()), rel=1e-9)


def test_no_mismatch_is_identity_and_metrics_neutral():
    logp, old, _, mask, adv, g = make_batch()
    for level in LEVELS:
        obj = ratiorl.objective("grpo", beta=0.0, mismatch_level=level)
        out = obj(logp, old, adv, mask, group_ids=g, behaviour_logp=old.clone())
        ref = ratiorl.objective("grpo", beta=0.0)(logp, old, adv, mask)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
        assert out.metrics["mismatch_ess"] == pytest.approx(1.0)
        assert out.metrics["mismatch_kl_k3"] == 0.0 and out.metrics["mismatch_token_frac"] == 0.0


def test_divergence_rejection():
    logp, old, mu, mask, adv, g = make_batch(seed=4, noise=0.6)
    for kind in mismatch.DIVERGENCES:
        obj = ratiorl.objective("grpo", beta=0.0, mismatch_level="token", mismatch_mode="reject",
                                mismatch_divergence=kind, mismatch_high=0.15)
        out = obj(logp, old, adv, mask, group_ids=g, behaviour_logp=mu, return_details=True)
        d = ((old - mu) * mask).numpy()
        est, red = kind.split("_")
        tok = {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - 1 - d}[est]
        m = mask.numpy() > 0
        for i in range(mask.shape[0]):
            if not m[i].any():
                continue
            D = tok[i][m[i]].mean() if red == "mean" else tok[i][m[i]].max()
            kept = bool((out.details.correction[i] * mask[i]).sum() > 0)
            assert kept == (D <= 0.15), (kind, i, D)


def test_long_sequences_stay_finite():
    torch.manual_seed(0)
    B, T = 2, 8192
    old = -torch.rand(B, T) * 3
    mu = (old - 0.5 - 0.5 * torch.rand(B, T)).clamp(max=0)  # pi_old/mu ~ e^0.75 per token: e^6000 per sequence
    mu[1] = (old[1] + 0.7).clamp(max=0)                      # the other direction
    mask = torch.ones(B, T)
    adv = torch.tensor([1.0, -1.0])
    for level in LEVELS:
        for mode in MODES:
            for norm in ("none", "batch"):
                obj = ratiorl.objective("grpo", beta=0.0, mismatch_level=level, mismatch_mode=mode,
                                        mismatch_normalize=norm, mismatch_scope="batch") \
                    if level == "self_normalized" else ratiorl.objective(
                        "grpo", beta=0.0, mismatch_level=level, mismatch_mode=mode, mismatch_normalize=norm)
                x = (old + 0.01).requires_grad_(True)
                out = obj(x, old, adv, mask, behaviour_logp=mu)
                out.loss.backward()
                assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all(), (level, mode, norm)
                assert all(math.isfinite(v) for v in out.metrics.values() if isinstance(v, float)), (level, mode)


def test_decoupled_without_old_logp_uses_mu():
    logp, old, mu, mask, adv, g = make_batch()
    obj = ratiorl.objective("grpo", beta=0.0)
    a = obj(logp, None, adv, mask, behaviour_logp=mu)
    b = obj(logp, mu, adv, mask)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="old_logp is None"):
        obj(logp, None, adv, mask)


def test_proximal_loglinear():
    logp, old, mu, mask, adv, g = make_batch()
    bv = torch.tensor([5, 5, 4, 3, 5, 2, 4, 5])
    obj = ratiorl.objective("grpo", beta=0.0, proximal="loglinear", mismatch_level="token", mismatch_high=10.0)
    assert obj.needs_policy_versions and not obj.needs_old_logp and obj.needs_behaviour_logp
    x = logp.clone().requires_grad_(True)
    out = obj(x, None, adv, mask, behaviour_logp=mu, behaviour_version=bv, policy_version=5)
    out.loss.backward()
    lag = (5 - bv).to(logp.dtype)
    alpha = (lag / (lag + 1))[:, None]  # AReaL: (v_prox - v_mu) / (v_theta - v_mu), v_theta = v_prox + 1
    prox = mu + alpha * (logp - mu)
    y = logp.clone().requires_grad_(True)
    ref = ratiorl.objective("grpo", beta=0.0, mismatch_level="token", mismatch_high=10.0)(
        y, prox, adv, mask, behaviour_logp=mu)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-14)
    # rows sampled by the current weights: pi_old = mu exactly
    assert torch.equal(prox[0], mu[0])
    with pytest.raises(ValueError, match="needs behaviour_version"):
        obj(logp, None, adv, mask, behaviour_logp=mu)
    with pytest.raises(ValueError, match="pass old_logp=None"):
        obj(logp, old, adv, mask, behaviour_logp=mu, behaviour_version=bv, policy_version=5)
    with pytest.raises(ValueError, match="behaviour_version must be <="):
        obj(logp, None, adv, mask, behaviour_logp=mu, behaviour_version=bv, policy_version=3)


def test_level_none_warns_once_and_ignores():
    logp, old, mu, mask, adv, g = make_batch()
    mismatch._warned_ignored = False
    obj = ratiorl.objective("grpo", beta=0.0)
    assert not obj.uses_mismatch and not obj.needs_old_logp and not obj.needs_behaviour_logp
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = obj(logp, old, adv, mask, behaviour_logp=mu)
        obj(logp, old, adv, mask, behaviour_logp=mu)
    assert len([w for w in rec if "behaviour_logp is ignored" in str(w.message)]) == 1
    assert not any(k.startswith("mismatch") for k in a.metrics)
    torch.testing.assert_close(a.loss, obj(logp, old, adv, mask).loss, rtol=0, atol=0)


def test_routing_config_and_capabilities():
    obj = ratiorl.objective("grpo", mismatch_level="token", mismatch_mode="truncate", mismatch_high=2.5)
    assert obj.mismatch_high == 2.5 and obj.mismatch_low == 0.0 and obj.uses_mismatch and obj.needs_old_logp
    assert obj.options("mismatch_mode") == {"mismatch_low": 0.0, "mismatch_high": 2.5}
    m = obj.replace(mismatch_mode="mask")  # mode-dependent defaults come from the new entry's signature
    assert (m.mismatch_low, m.mismatch_high) == (0.5, 2.5)
    assert ratiorl.objective("grpo", mismatch_level="self_normalized").needs_groups
    assert ratiorl.objective("grpo", advantage="none", mismatch_level="self_normalized").needs_groups
    assert not ratiorl.objective("grpo", advantage="none", mismatch_level="self_normalized",
                                 mismatch_scope="batch").needs_groups
    assert obj == ratiorl.objective("grpo", mismatch_level="token", mismatch_high=2.5)
    import pickle
    assert pickle.loads(pickle.dumps(obj)).mismatch_high == 2.5


def test_yaml_overrides_build_the_objective():
    pytest.importorskip("omegaconf")
    from ratiorl.train import config as cfgmod

    cfg = cfgmod.config_from_dict({"objective": {"name": "grpo", "overrides": {
        "mismatch_level": "cumulative", "mismatch_mode": "mask", "mismatch_high": 3.0}}})
    obj = cfgmod.objective_from_config(cfg)
    assert (obj.mismatch_level, obj.mismatch_mode, obj.mismatch_high, obj.mismatch_low) == ("cumulative", "mask", 3.0, 0.5)


def test_register_a_new_level():
    @MISMATCH_LEVELS.register("test_first_token", level="sequence")
    def first_token(d, info, *, scale: float = 1.0):
        return scale * d[:, 0]

    try:
        logp, old, mu, mask, adv, g = make_batch()
        obj = ratiorl.objective("grpo", beta=0.0, mismatch_level="test_first_token", scale=0.5, mismatch_high=100.0)
        out = obj(logp, old, adv, mask, behaviour_logp=mu, return_details=True)
        exp = torch.exp(0.5 * (old - mu)[:, 0]) * (mask.sum(1) > 0)
        torch.testing.assert_close(out.details.correction, exp)
    finally:
        MISMATCH_LEVELS.pop("test_first_token")


def test_bad_inputs():
    logp, old, mu, mask, adv, g = make_batch()
    obj = ratiorl.objective("grpo", beta=0.0, mismatch_level="token")
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        obj(logp, old, adv, mask, behaviour_logp=mu[:, :-1])
    bad = mu.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="behaviour_logp contains NaN"):
        obj(logp, old, adv, mask, behaviour_logp=bad)
    out = obj.replace(nonfinite="mask")(logp, old, adv, mask, behaviour_logp=bad, return_details=True)
    assert out.details.correction[0].abs().sum() == 0 and torch.isfinite(out.loss)
    bad[4, 0] = float("nan")  # on padding (row 4 is empty): ignored
    bad[0, 1] = -1.0
    obj(logp, old, adv, mask, behaviour_logp=bad)
    pos = mu.clone()
    pos[1, 2] = 0.5
    with pytest.raises(ValueError, match="positive value"):
        obj(logp, old, adv, mask, behaviour_logp=pos)
    with pytest.raises(ValueError, match="needs behaviour_logp"):
        obj(logp, old, adv, mask)
    with pytest.raises(ValueError, match="mismatch_low must be <= mismatch_high"):
        ratiorl.objective("grpo", mismatch_level="token", mismatch_mode="mask", mismatch_low=2.0, mismatch_high=1.5)
    with pytest.raises(ValueError, match="mismatch_high must be a finite number > 0"):
        ratiorl.objective("grpo", mismatch_high=0.0)
    with pytest.raises(ValueError, match="valid mismatch_levels: cumulative, geometric, none, self_normalized"):
        ratiorl.objective("grpo", mismatch_level="tokens")
    with pytest.raises(ValueError, match="valid mismatch_modes: mask, reject, truncate"):
        ratiorl.objective("grpo", mismatch_mode="clip")
    with pytest.raises(ValueError, match="mismatch_normalize must be one of none, batch"):
        ratiorl.objective("grpo", mismatch_normalize="group")
    with pytest.raises(ValueError, match="valid proximals"):
        ratiorl.objective("grpo", proximal="linear")
    with pytest.raises(ValueError, match="mismatch_divergence must be None or one of"):
        ratiorl.objective("grpo", mismatch_mode="reject", mismatch_divergence="k4_mean")
    with pytest.raises(ValueError, match="mismatch_divergence"):  # only the reject mode declares it
        ratiorl.objective("grpo", mismatch_mode="mask", mismatch_divergence="k3_mean")
    with pytest.raises(ValueError, match="mismatch_scope='batch'"):
        ratiorl.objective("grpo", beta=0.0, mismatch_level="self_normalized")(logp, old, adv, mask, behaviour_logp=mu)


def test_registries_declare_capabilities():
    assert {k: f.level for k, f in MISMATCH_LEVELS.items()}.items() >= {
        "none": None, "token": "token", "cumulative": "token", "geometric": "sequence", "sequence": "sequence",
        "self_normalized": "sequence"}.items()
    assert {k: f.action for k, f in MISMATCH_MODES.items()}.items() >= {
        "truncate": "truncated", "mask": "masked", "reject": "rejected"}.items()
