"""Token selection: which elements keep their policy-gradient loss (docs/objectives.md, "Token selection").

A selection is ``fn(inp, info, *, <options>) -> Selection`` registered in ``TOKEN_SELECTIONS``; its
options are its keyword-only parameters. It runs after the shaping, on the per-element loss L:

    L <- L * keep + extra          (before the mismatch correction, the KL term and the aggregation)

``keep`` is a detached 0/1 float tensor broadcastable to (B, T) (a (B, 1) column drops whole
sequences), ``extra`` an optional (B, T) additive loss with its own gradient (KL-Cov's penalty).
Dropped tokens keep counting in every normaliser of the aggregation (they contribute loss 0), as in
verl and TRL. Capabilities: ``identity=True`` (``none``: the core skips the step),
``needs_entropy=True`` (the call must pass ``entropy=`` (B, T)),
``reads_behaviour_logp=True`` (reads the sampler's log-probs when given, else ``old_logp``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._registry import Registry

TOKEN_SELECTIONS = Registry("token selection")


class SelectionInputs(NamedTuple):
    logp: torch.Tensor  # (B, T) log pi_theta, detached, compute dtype
    delta: torch.Tensor  # (B, T) clamped log-ratio logp - old_logp with its gradient, 0 on padding
    adv: torch.Tensor  # advantages, (B, 1) (one per sequence) or (B, T)
    shaped: object  # the shaping's ``Shaped`` (clip masks)
    entropy: Optional[torch.Tensor]  # (B, T) per-token entropy, detached, or None
    sampling_logp: torch.Tensor  # (B, T) log mu when behaviour_logp was given, else old_logp


class Selection(NamedTuple):
    keep: Optional[torch.Tensor] = None  # 0/1 float broadcastable to (B, T), None = keep all
    extra: Optional[torch.Tensor] = None  # (B, T) additive loss with gradient, or None


@TOKEN_SELECTIONS.register("none", identity=True)
def none(inp, info):
    return Selection()


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation) of a 1-D tensor; a sort-based copy beyond its size limit."""
    if v.numel() <= 2**24:
        return torch.quantile(v, q)
    s = torch.sort(v).values
    pos = (s.numel() - 1) * q
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return torch.lerp(s[lo], s[hi], pos - lo)


@TOKEN_SELECTIONS.register("top_entropy", needs_entropy=True)
def top_entropy(inp, info, *, top_entropy_quantile: float = 0.2):
    # "Beyond the 80/20 rule" (Wang et al. 2025, arXiv:2506.01939), TRL top_entropy_quantile: train on the
    # tokens whose entropy is >= the (1 - q)-quantile of the valid tokens' entropies (q = 1 keeps all).
    mb = info.mask_bool
    vals = inp.entropy[mb]
    if vals.numel() == 0:
        return Selection(torch.zeros_like(info.mask))
    thr = _quantile(vals, 1.0 - top_entropy_quantile)
    return Selection(((inp.entropy * info.mask >= thr) & mb).to(info.mask.dtype))


@TOKEN_SELECTIONS.register("opsm", reads_behaviour_logp=True)
def opsm(inp, info, *, opsm_threshold: float = 0.5):
    # Off-policy sequence mask (DeepSeek-V3.2 eq. 9; TRL off_policy_mask_threshold): drop a sequence when
    # A < 0 and its mean token KL estimate mean_t (log mu - log pi_theta) > delta. mu = behaviour_logp if
    # given, else old_logp. NaN log mu counts as 0 (TRL). Keep = (A >= 0) | (KL <= delta).
    d = torch.nan_to_num(inp.sampling_logp - inp.logp, nan=0.0)
    kl = (d * info.mask).sum(1, keepdim=True) / info.lengths.clamp_min(1.0)[:, None]
    return Selection(((inp.adv >= 0) | (kl <= opsm_threshold)).to(info.mask.dtype))  # (B, 1) or (B, T)


def _cov(inp, info):
    """Per-token covariance term (A - mean A)(log pi - mean log pi), means over the valid tokens."""
    n = info.lengths.sum().clamp_min(1.0)
    A = inp.adv
    a_mean = (A[:, 0] @ info.lengths if A.shape[1] == 1 else (A * info.mask).sum()) / n
    l_mean = torch.dot(inp.logp.reshape(-1), info.mask.reshape(-1)) / n
    return (A - a_mean) * (inp.logp - l_mean)


@TOKEN_SELECTIONS.register("clip_cov")
def clip_cov(inp, info, *, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0):
    # Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617, sec. 4.2;
    # verl compute_policy_loss_clip_cov): among the valid tokens the shaping did not clip whose covariance
    # lies in (lb, ub), a random subset of max(1, int(ratio * N)) gets no gradient (loss 0). The subset is
    # drawn with torch.randperm on the CPU generator, as verl does (same seed -> same tokens).
    cov = _cov(inp, info)
    cand = (cov > clip_cov_lb) & (cov < clip_cov_ub) & info.mask_bool
    lo, hi = inp.shaped.clipped_low, inp.shaped.clipped_high
    clipped = lo if hi is None else (hi if lo is None else lo | hi)
    if clipped is not None:
        cand = cand & ~torch.broadcast_to(clipped, cand.shape)
    idx = torch.nonzero(cand)
    keep = torch.ones_like(info.mask)
    if len(idx):
        k = max(int(clip_cov_ratio * int(info.mask.sum().item())), 1)
        idx = idx[torch.randperm(len(idx))[:min(k, len(idx))].to(idx.device)]
        keep[idx[:, 0], idx[:, 1]] = 0
    return Selection(keep)


@TOKEN_SELECTIONS.register("kl_cov")
def kl_cov(inp, info, *, kl_cov_ratio: float = 2e-4, ppo_kl_coef: float = 1.0):
    # KL-Cov (Cui et al. 2025, arXiv:2505.22617, sec. 4.2; verl compute_policy_loss_kl_cov): the top
    # max(1, int(ratio * N)) valid tokens by covariance get the penalty ppo_kl_coef * |log pi - log pi_old|
    # added to their loss (gradient through log pi); all tokens keep their policy-gradient loss.
    n = int(info.lengths.sum().item())
    if n == 0:
        return Selection()
    with torch.no_grad():
        cov = torch.where(info.mask_bool, _cov(inp, info), -torch.inf).reshape(-1)
        top = torch.topk(cov, max(1, int(n * kl_cov_ratio)), largest=True).indices
        flag = torch.zeros_like(cov)
        flag[top] = ppo_kl_coef
    return Selection(None, inp.delta.abs() * flag.view_as(inp.delta))


def check_entropy(entropy, logp) -> None:
    """entropy must be a floating-point (B, T) tensor like logp."""
    if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
        raise ValueError(f"entropy must be a floating-point torch.Tensor (B, T), got {type(entropy).__name__}")
    if tuple(entropy.shape) != tuple(logp.shape):
        raise ValueError(f"entropy has shape {tuple(entropy.shape)} but logp has shape {tuple(logp.shape)}; "
                         "both must be (B, T)")


def entropy_term(entropy, agg, agg_level, info, opts):
    """The aggregated entropy H (with its gradient), by the objective's own aggregation (verl's
    entropy loss: agg_loss(entropy, response_mask, loss_agg_mode))."""
    if agg_level == "token":
        return agg(entropy, info, **opts)
    return agg(info.seq_mean(entropy), info, **opts)


__all__ = ["TOKEN_SELECTIONS", "Selection", "SelectionInputs", "check_entropy", "entropy_term"]
