"""The mismatch correction against TRL's ``vllm_importance_sampling_correction`` and verl's
``rollout_correction``, each run from that library's own code (skipped when not installed).

TRL computes its ratio inline in ``GRPOTrainer._generate_and_score_completions``; the test runs
that block of TRL's installed source text (found by its first and last lines) on our tensors.
verl's functions (``verl.trainer.ppo.rollout_corr_helper``) are called directly.
"""

import importlib.util
import math
import textwrap
import types

import pytest
import torch

import ratiorl


def batch(seed=0, B=8, T=16, noise=0.35):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    mu = (old + noise * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    logp = old + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, T - 3, 2, T, 9, 5, T - 1, 7][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, mu, mask, adv


def ours(level, mode, low, high, normalize="none", **kw):
    logp, old, mu, mask, adv = batch(**kw)
    obj = ratiorl.objective("grpo", beta=0.0, mismatch_level=level, mismatch_mode=mode, mismatch_low=low,
                            mismatch_high=high, mismatch_normalize=normalize)
    c = obj(logp, old, adv, mask, behaviour_logp=mu, return_details=True).details.correction
    return (c[:, None] * mask if c.dim() == 1 else c), old, mu, mask


# ----------------------------------------------------------------------------- TRL


def _trl_block():
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    path = spec.submodule_search_locations[0] + "/trainer/grpo_trainer.py"
    try:
        lines = open(path).read().splitlines()
    except OSError:
        pytest.skip("trl/trainer/grpo_trainer.py not found")
    first = "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask"
    starts = [i for i, ln in enumerate(lines) if first in ln]
    if len(starts) != 1:
        pytest.skip("TRL's vllm_importance_sampling_correction block was not found in this TRL version")
    i = starts[0] - 2  # the `if self.use_vllm and ...:` line and `mask = ...`
    assert "vllm_importance_sampling_correction" in lines[i]
    indent = len(lines[i]) - len(lines[i].lstrip())
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
        j += 1
    return textwrap.dedent("\n".join(lines[i:j]))


def trl_ratio(mode, clip_min, clip_max, old, mu, mask):
    trainer = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                    vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                    vllm_importance_sampling_clip_max=clip_max)
    ns = dict(self=trainer, torch=torch, math=math, completion_mask=mask, tool_mask=None,
              old_per_token_logps=old, sampling_per_token_logps=mu)
    exec(_trl_block(), ns)
    return ns["vllm_importance_sampling_ratio"]


TRL_MODES = {"token_truncate": ("token", "truncate"), "token_mask": ("token", "mask"),
             "sequence_truncate": ("sequence", "truncate"), "sequence_mask": ("sequence", "mask")}


@pytest.mark.parametrize("trl_mode", list(TRL_MODES))
@pytest.mark.parametrize("clip_min", [None, 0.6])
def test_trl_vllm_importance_sampling_modes(trl_mode, clip_min):
    level, mode = TRL_MODES[trl_mode]
    clip_max = 1.8 if level == "token" else 3.0
    c, old, mu, mask = ours(level, mode, clip_min or 0.0, clip_max)
    r = trl_ratio(trl_mode, clip_min, clip_max, old, mu, mask)
    r = r.expand_as(mask) * mask  # TRL: (B, T) token modes, (B, 1) sequence modes; it masks in the loss
    assert ((r > 0) & (r < clip_max)).any()
    torch.testing.assert_close(c, r, rtol=1e-12, atol=1e-14)


def test_trl_loss_multiplies_the_per_token_loss():
    """TRL multiplies the per-token clipped loss by the ratio before its loss_type aggregation ('grpo':
    seq_mean_token_mean), keeping the mask: our loss is the same number."""
    logp, old, mu, mask, adv = batch(seed=1)
    r = trl_ratio("token_mask", None, 1.5, old, mu, mask)
    ratio = torch.exp(logp - old)
    A = adv[:, None]
    L = -torch.minimum(ratio * A, ratio.clamp(0.8, 1.2) * A) * r
    trl_loss = ((L * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    obj = ratiorl.objective("grpo", beta=0.0, mismatch_level="token", mismatch_mode="mask", mismatch_low=0.0,
                            mismatch_high=1.5)
    torch.testing.assert_close(obj(logp, old, adv, mask, behaviour_logp=mu).loss, trl_loss, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- verl


@pytest.fixture(scope="module")
def verl_rc():
    try:
        from verl.trainer.ppo import rollout_corr_helper
    except Exception as e:  # not installed, or an incompatible dependency
        pytest.skip(f"verl is not importable: {type(e).__name__}: {e}")
    return rollout_corr_helper


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, "0.5_2.0"])
@pytest.mark.parametrize("normalize", [False, True])
def test_verl_rollout_is(verl_rc, level, threshold, normalize):
    """rollout_is token/sequence TIS (a float threshold) and IcePop (a 'lower_upper' band), with and
    without rollout_is_batch_normalize."""
    if isinstance(threshold, str):
        low, high = map(float, threshold.split("_"))
        mode = "mask"
    else:
        low, high, mode = 0.0, float(threshold), "truncate"
    c, old, mu, mask = ours(level, mode, low, high, "batch" if normalize else "none", noise=0.25)
    w, _ = verl_rc.compute_rollout_correction_weights(old - mu, mask, rollout_is=level, rollout_is_threshold=threshold,
                                                      rollout_is_batch_normalize=normalize)
    assert (w * mask < high).any() and (w * mask > 0).any()
    rtol = 1e-8 if normalize else 1e-12  # verl's masked_mean divides by (count + 1e-8)
    torch.testing.assert_close(c, w * mask, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("band", [(0.9, 1.1), (0.95, 1.02)])
def test_verl_geometric_rejection(verl_rc, band):
    """verl's seq_mean_k1 rejection bounds mean(log mu - log pi_old) in [log lo, log hi]: the geometric
    ratio pi_old/mu in [1/hi, 1/lo], which is our geometric level with the reject mode."""
    lo, hi = band
    c, old, mu, mask = ours("geometric", "reject", 1 / hi, 1 / lo, noise=0.3)
    verl_mask, _ = verl_rc.compute_rollout_rejection_mask(old - mu, mask, rollout_rs="seq_mean_k1",
                                                          rollout_rs_threshold=f"{lo}_{hi}")
    kept_ours = (c > 0).to(mask.dtype) * mask
    assert 0 < kept_ours.sum() < mask.sum()
    torch.testing.assert_close(kept_ours, verl_mask.to(mask.dtype))


@pytest.mark.parametrize("kind", ["k2_mean", "k3_mean", "k2_max", "k3_max"])
def test_verl_divergence_rejection(verl_rc, kind):
    est, red = kind.split("_")
    thr = 0.04 if red == "mean" else 0.2
    logp, old, mu, mask, adv = batch(noise=0.3)
    obj = ratiorl.objective("grpo", beta=0.0, mismatch_level="token", mismatch_mode="reject",
                            mismatch_divergence=kind, mismatch_high=thr)
    c = obj(logp, old, adv, mask, behaviour_logp=mu, return_details=True).details.correction
    verl_mask, _ = verl_rc.compute_rollout_rejection_mask(old - mu, mask, rollout_rs=f"seq_{red}_{est}",
                                                          rollout_rs_threshold=thr)
    kept_ours = (c > 0).to(mask.dtype) * mask
    assert 0 < kept_ours.sum() < mask.sum()
    torch.testing.assert_close(kept_ours, verl_mask.to(mask.dtype))
