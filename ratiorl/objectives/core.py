"""The composed objective: ``Objective`` (frozen dataclass), ``objective(name, **overrides)``.

One call runs the axes in order (SPEC sections 2-5)::

    delta  = clamp(logp - old_logp, -20, 20) * mask            (float32, section 7)
    w      = WEIGHTS[weight](delta)          -> log weight, token- or sequence-level
    L      = SHAPINGS[shaping](exp(log w), A)                   per-element loss
    L     += beta * KL placement                                (section 5)
    loss   = AGGREGATIONS[aggregation](L)                       (section 4)

Metrics are computed under ``no_grad`` and moved to the host with a single ``.tolist()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from ._batch import BatchInfo
from ._ops import clamp_abs
from .advantages import ADVANTAGES
from .aggregate import AGGREGATIONS
from .kl import KL_ESTIMATORS, KL_PLACEMENTS
from .presets import PRESETS
from .shaping import RULES, SHAPINGS
from .weights import WEIGHTS


@dataclass(frozen=True)
class ObjectiveOutput:
    """``loss``: 0-dim tensor, differentiable w.r.t. logp (and token_kl).
    ``metrics``: dict[str, float] (see ``Objective``); ``clip_frac_by_position`` is a list[float]."""

    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """A policy-gradient objective: one value per axis plus every hyperparameter (SPEC 2-8).

    Call it as ``obj(logp, old_logp, advantages, mask, *, group_ids=None, ref_logp=None,
    token_kl=None, num_tokens=None, num_sequences=None) -> ObjectiveOutput``.

    Metrics (floats): ``clip_frac`` (= ``clip_frac_low`` + ``clip_frac_high``: fraction of valid
    tokens -- or of non-empty sequences for a sequence-level weight -- where the clip bound is
    active and lowers the objective, PPO/TRL convention), ``weight_mean``, ``weight_max``,
    ``ess`` (normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1] of the weights
    over the same elements), ``dual_clip_frac`` (dual_clip / position_clip), ``kl`` (token mean
    of the KL estimator, when beta > 0), ``nonfinite_dropped`` (when nonfinite="mask"). With
    ``per_position_metrics=True`` also ``clip_frac_by_position``: a list of T floats, the clip
    fraction among valid tokens at each response position (sequence-level clips are broadcast to
    their tokens), the CTPO Fig. 1 diagnostic.

    Numerics: per-token log-ratios are clamped to +-``log_ratio_clamp``; summed log weights
    (sequence, sequence_token) to +-``max_log_weight`` (saturating, no gradient beyond the
    bound), and the cumulative weight's detached prefix sum likewise (see ``weights.py``);
    everything is computed in float32 (float64 for float64 inputs) whatever the input dtype.
    ``nonfinite="raise"`` raises ValueError naming a tensor with NaN/inf on a valid position;
    ``"mask"`` drops those sequences (their loss is 0 and B' counts only the kept ones unless
    ``num_sequences`` is given) and reports ``nonfinite_dropped``. NaN/inf on padding is ignored.
    """

    name: str = "custom"
    # axes
    weight: str = "token"
    shaping: str = "clip"
    rule: Optional[str] = None  # for shaping="weighted"; ignored otherwise
    aggregation: str = "token_mean"
    advantage: str = "group_norm"  # the trainer's default advantage method for this objective
    # clip
    clip_low: Optional[float] = 0.2
    clip_high: Optional[float] = 0.2
    dual_clip: float = 3.0
    # CTPO position-adaptive clip
    pos_clip_low: float = 0.025
    pos_clip_high: float = 0.05
    pos_power: float = 0.5
    pos_dual_clip: float = 0.05
    # SAPO gate
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    # gradient-weight family
    beta1: float = 0.75
    beta2: float = 1.0
    aspo_clip_low: float = 0.33
    aspo_clip_high: float = 3.0
    n: float = 1.0
    m: float = 2.0
    # self-normalised weights
    normalize_scope: str = "group"
    # KL
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"
    # aggregation
    max_tokens: Optional[int] = None
    # numerics and diagnostics
    log_ratio_clamp: float = 20.0
    max_log_weight: float = 20.0
    nonfinite: str = "raise"
    per_position_metrics: bool = False

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        w = WEIGHTS.lookup(self.weight)
        s = SHAPINGS.lookup(self.shaping)
        AGGREGATIONS.lookup(self.aggregation)
        KL_ESTIMATORS.lookup(self.kl_estimator)
        placement = KL_PLACEMENTS.lookup(self.kl_placement)
        ADVANTAGES.lookup(self.advantage)
        if self.shaping == "weighted":
            if self.rule is None:
                raise ValueError(f"shaping='weighted' needs rule=...; valid rules: {', '.join(RULES.names())}")
            RULES.lookup(self.rule)
        if getattr(s, "requires_token_level", False) and w.level != "token":
            raise ValueError(
                f"shaping={self.shaping!r} clips each token by its position, but weight={self.weight!r} is one "
                "value per sequence, so there is no per-position ratio to clip; use a token-level weight "
                f"({', '.join(k for k, f in WEIGHTS.items() if f.level == 'token')}) or shaping='clip'"
            )
        if self.beta > 0 and placement.needs_sequence_weight and w.level != "sequence":
            raise ValueError(
                f"kl_placement={self.kl_placement!r} weights each sequence's mean KL by its sequence weight "
                f"(SNIB Alg. 1 line 11), but weight={self.weight!r} is per token; use a sequence-level weight "
                f"({', '.join(k for k, f in WEIGHTS.items() if f.level == 'sequence')}) or kl_placement='loss_is'"
            )
        if self.normalize_scope not in ("group", "batch"):
            raise ValueError(f"normalize_scope must be 'group' or 'batch', got {self.normalize_scope!r}")
        if self.nonfinite not in ("raise", "mask"):
            raise ValueError(f"nonfinite must be 'raise' or 'mask', got {self.nonfinite!r}")
        if self.clip_low is not None and not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1) or None, got {self.clip_low}")
        if self.clip_high is not None and self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0 or None, got {self.clip_high}")
        if self.shaping == "dual_clip" and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (it caps the loss of negative-advantage tokens at -c*A), got {self.dual_clip}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.tau_pos <= 0 or self.tau_neg <= 0:
            raise ValueError(f"tau_pos and tau_neg must be > 0, got {self.tau_pos}, {self.tau_neg}")
        if self.log_ratio_clamp <= 0 or self.max_log_weight <= 0:
            raise ValueError("log_ratio_clamp and max_log_weight must be > 0")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens}")
        if self.shaping == "weighted" and self.rule == "dgpo" and (self.n <= 0 or self.m <= 0):
            raise ValueError(f"dgpo needs n > 0 and m > 0, got n={self.n}, m={self.m}")

    @property
    def level(self) -> str:
        """'token' or 'sequence': the level of this objective's importance weight."""
        return WEIGHTS[self.weight].level

    def replace(self, **changes) -> "Objective":
        """A copy with some fields changed (e.g. ``obj.replace(beta=controller.beta)``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the call
    def __call__(self, logp, old_logp, advantages, mask, *, group_ids=None, ref_logp=None, token_kl=None,
                 num_tokens=None, num_sequences=None) -> ObjectiveOutput:
        use_kl = self.beta > 0
        if not use_kl:
            ref_logp = token_kl = None  # unused: not checked, not computed
        elif self.kl_estimator == "exact":
            ref_logp = None
            KL_ESTIMATORS["exact"](None, None, token_kl, self)  # raises a clear error when missing
        else:
            token_kl = None
            if ref_logp is None:
                KL_ESTIMATORS[self.kl_estimator](logp, None, None, self)  # raises a clear error
        _check_inputs(logp, old_logp, advantages, mask, group_ids, ref_logp, token_kl, num_tokens, num_sequences)
        old_logp = old_logp.detach()
        advantages = advantages.detach()
        ref_logp = ref_logp.detach() if ref_logp is not None else None
        # float32 at least (bf16/fp16 inputs are upcast); float64 inputs stay float64
        cd = torch.promote_types(torch.promote_types(logp.dtype, old_logp.dtype), torch.float32)
        maskf = mask.to(cd)

        n_dropped = 0
        fast = logp.detach().sum(dtype=torch.float32) + old_logp.sum(dtype=torch.float32) + advantages.sum(dtype=torch.float32)
        for t in (ref_logp, token_kl):
            if t is not None:
                fast = fast + t.detach().sum(dtype=torch.float32)
        if not bool(torch.isfinite(fast)):  # slow path only when something is not finite
            logp, old_logp, advantages, ref_logp, token_kl, maskf, n_dropped = self._handle_nonfinite(
                logp, old_logp, advantages, ref_logp, token_kl, maskf)

        info = BatchInfo(maskf, group_ids, num_tokens, num_sequences, n_dropped)
        c = self.log_ratio_clamp
        delta = clamp_abs(logp.to(cd) - old_logp.to(cd), c) * maskf  # SPEC 7: float32, clamped, 0 on padding

        w = WEIGHTS[self.weight](delta, info, self)
        x = torch.exp(w.log_w)
        A = advantages.to(cd)
        if w.level == "token":
            A_el = A[:, None] if A.dim() == 1 else A
        else:
            A_el = A if A.dim() == 1 else info.seq_mean(A)  # one advantage per sequence
        shaped = SHAPINGS[self.shaping](x, A_el, w, info, self)
        L = shaped.loss

        # KL (SPEC section 5)
        kl_tok = kl_add = kl_extra = None
        if use_kl:
            kl_tok = KL_ESTIMATORS[self.kl_estimator](logp, ref_logp, token_kl, self)
            if self.kl_placement == "is_weighted":
                # SNIB Alg. 1 line 11: K = (1/B') sum_i w_i * mean_t kl_it, same weight w as the policy term
                K = info.seq_mean(kl_tok)
                kl_extra = self.beta * (x * K * info.seq_valid).sum() / info.num_sequences
            else:
                x_tok = x if w.level == "token" else x[:, None]
                kl_add = self.beta * KL_PLACEMENTS[self.kl_placement](kl_tok, x_tok)

        agg = AGGREGATIONS[self.aggregation]
        if agg.level == "token":
            L_tok = L if w.level == "token" else L[:, None]
            if kl_add is not None:
                L_tok = L_tok + kl_add
            loss = agg(L_tok, info, self)
        else:
            if w.level == "token":
                L_seq = info.seq_mean(L) if L.dim() == 2 else L
            else:
                L_seq = L * info.seq_valid  # empty / dropped responses contribute 0
            if kl_add is not None:
                L_seq = L_seq + info.seq_mean(kl_add)  # TRL GSPO: the sequence's mean token KL
            loss = agg(L_seq, info, self)
        if kl_extra is not None:
            loss = loss + kl_extra

        metrics = self._metrics(x, w.level, shaped, info, kl_tok, n_dropped)
        return ObjectiveOutput(loss, metrics)

    # ------------------------------------------------------------------ helpers
    def _handle_nonfinite(self, logp, old_logp, advantages, ref_logp, token_kl, maskf):
        valid = maskf > 0
        bad_rows = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
        named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "ref_logp": ref_logp,
                 "token_kl": token_kl}
        clean = {}
        for name, t in named.items():
            if t is None:
                clean[name] = None
                continue
            finite = torch.isfinite(t.detach())
            bad = ~finite & valid if t.dim() == 2 else ~finite
            rows = bad.any(1) if t.dim() == 2 else bad
            if bool(rows.any()) and self.nonfinite == "raise":
                idx = rows.nonzero().flatten()[:8].tolist()
                raise ValueError(
                    f"{name} contains NaN/inf at {int(bad.sum())} valid position(s) (rows {idx}"
                    f"{'...' if int(rows.sum()) > 8 else ''}); fix the input or pass nonfinite='mask' to "
                    "drop those sequences"
                )
            bad_rows |= rows
            clean[name] = torch.where(finite, t, torch.zeros_like(t))  # also cleans padding
        maskf = maskf * (~bad_rows).to(maskf.dtype)[:, None]
        return (clean["logp"], clean["old_logp"], clean["advantages"], clean["ref_logp"], clean["token_kl"],
                maskf, int(bad_rows.sum()))

    @torch.no_grad()
    def _metrics(self, x, level, shaped, info, kl_tok, n_dropped):
        xv = x.detach()
        mb = info.mask_bool if level == "token" else info.seq_valid
        m = info.mask if level == "token" else info.seq_valid.to(info.mask.dtype)
        n = m.sum().clamp_min(1.0)
        xm = xv * m
        zero = xm.new_zeros(())
        wmax = xm.max() if xm.numel() else zero
        xn = xm * (1.0 / wmax.clamp_min(1e-30))  # scaled to <= 1: sum of squares cannot overflow
        s1n = xn.sum()

        def count(c):  # valid elements where the bool mask c is set
            return torch.count_nonzero(c & mb).to(xm.dtype) if c is not None else zero

        low, high = count(shaped.clipped_low), count(shaped.clipped_high)
        vals = [low / n, high / n, s1n * wmax / n, wmax, s1n * s1n / (n * (xn * xn).sum()).clamp_min(1e-30)]
        keys = ["clip_frac_low", "clip_frac_high", "weight_mean", "weight_max", "ess"]
        if shaped.clipped_dual is not None:
            vals.append(count(shaped.clipped_dual) / n)
            keys.append("dual_clip_frac")
        if kl_tok is not None:
            vals.append((kl_tok.detach() * info.mask).sum() / info.mask.sum().clamp_min(1.0))
            keys.append("kl")
        out = dict(zip(keys, torch.stack(vals).tolist()))
        out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
        if self.nonfinite == "mask":
            out["nonfinite_dropped"] = float(n_dropped)
        if self.per_position_metrics:
            clipped = torch.zeros_like(xv)
            for c in (shaped.clipped_low, shaped.clipped_high):
                if c is not None:
                    clipped = clipped + c
            if level == "sequence":
                clipped = clipped[:, None]
            out["clip_frac_by_position"] = ((clipped * info.mask).sum(0) / info.mask.sum(0).clamp_min(1.0)).tolist()
        return out


def _check_inputs(logp, old_logp, advantages, mask, group_ids, ref_logp, token_kl, num_tokens, num_sequences):
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    B = shape[0]
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("token_kl", token_kl)):
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has shape {shape}; both must be (B, T)")
    if tuple(advantages.shape) not in ((B,), shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected (B,) = ({B},) or (B, T) = {shape}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp),
                    ("token_kl", token_kl)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or float (0/1), got dtype {mask.dtype}")
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor) or tuple(group_ids.shape) != (B,):
            got = tuple(group_ids.shape) if isinstance(group_ids, torch.Tensor) else type(group_ids).__name__
            raise ValueError(f"group_ids must be a (B,) = ({B},) tensor of ints, got {got}")
        if group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    for name, v in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if v is not None and not isinstance(v, torch.Tensor) and v <= 0:
            raise ValueError(f"{name} must be > 0 when given, got {v}")


_FIELDS = tuple(f.name for f in dataclasses.fields(Objective) if f.name != "name")


def objective(name: str, **overrides) -> Objective:
    """The preset ``name`` of SPEC section 8 with some fields overridden.

    ``objective("snib", clip_low=0.2, beta=0.1)``; ``objective("grpo", weight="cumulative")``.
    Unknown names or override keys raise ``ValueError`` listing the valid ones.
    """
    preset = PRESETS.lookup(name)
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown objective field(s) {unknown}; valid keys: {', '.join(_FIELDS)}")
    return Objective(name=name, **{**preset.fields, **overrides})


def available_objectives() -> list[str]:
    """Sorted list of preset names."""
    return PRESETS.names()


__all__ = ["Objective", "ObjectiveOutput", "objective", "available_objectives"]
