"""The composed objective: ``Objective`` (frozen dataclass), ``objective(name, **overrides)``.

One call runs the axes in order (docs/objectives.md)::

    delta  = clamp(logp - old_logp, -20, 20) * mask            (float32)
    w      = WEIGHTS[weight](delta, info, **weight_options)     log weight, token- or sequence-level
    L      = SHAPINGS[shaping](exp(log w), A, w, info, **shaping_options)   per-element loss
    L     += beta * KL placement                                (KL_ESTIMATORS, KL_PLACEMENTS)
    loss   = AGGREGATIONS[aggregation](L, info, **aggregation_options)

Entries and resolved options are looked up once, at construction. Metrics are computed under
``no_grad`` and moved to the host with a single ``.tolist()``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._registry import check_keyword_options
from ._batch import BatchInfo
from ._inputs import check_inputs, handle_nonfinite
from ._ops import clamp_abs
from .kl import KL_PLACEMENTS, missing_input_message
from .mismatch import apply_correction, check_mismatch_fields, correction, resolve_old_logp
from .options import AXES, OPTION_FIELDS, REGISTRIES, capability, check_combination, check_values, compose, selected_entries
from .presets import PRESETS


@dataclass(frozen=True)
class ObjectiveDetails:
    """Per-element tensors of one call (``return_details=True``), all detached.

    ``weight``: the importance weight, (B, T) for a token-level weight, (B,) for a sequence-level
    one; ``log_weight``: its log; ``level``: "token" | "sequence"; ``mask``: (B, T) float, 1 on
    counted tokens (0 on dropped sequences); ``clipped_low`` / ``clipped_high`` / ``clipped_dual``:
    bool, weight-shaped, where that bound is active on a valid element (None when the shaping
    never clips); ``clipped_by_token``: (B, T) float 0/1, clipped low or high (sequence clips
    broadcast to their tokens); ``token_kl``: (B, T) per-token KL of the estimator or None.
    """

    weight: torch.Tensor
    log_weight: torch.Tensor
    level: str
    mask: torch.Tensor
    clipped_low: Optional[torch.Tensor]
    clipped_high: Optional[torch.Tensor]
    clipped_dual: Optional[torch.Tensor]
    clipped_by_token: torch.Tensor
    token_kl: Optional[torch.Tensor] = None
    correction: Optional[torch.Tensor] = None  # applied mismatch correction pi_old/mu (mismatch.py) or None


@dataclass(frozen=True)
class ObjectiveOutput:
    """``loss``: 0-dim tensor, differentiable w.r.t. logp (and token_kl).
    ``metrics``: dict[str, float] (see ``Objective``); ``clip_frac_by_position`` is a list[float].
    ``details``: ``ObjectiveDetails`` when called with ``return_details=True``, else None."""

    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    details: Optional[ObjectiveDetails] = None


@dataclass(frozen=True)
class Objective:
    """A policy-gradient objective: one registry entry per axis, with its options.

    Call it as ``obj(logp, old_logp, advantages, mask, *, group_ids=None, ref_logp=None,
    token_kl=None, num_tokens=None, num_sequences=None, return_details=False, behaviour_logp=None,
    behaviour_version=None, policy_version=None) -> ObjectiveOutput`` (behaviour_*: mismatch.py).

    ``<axis>_options`` hold the options given explicitly; the others are the defaults in the
    entry's signature. ``obj.option("clip_low")`` / ``obj.clip_low`` read a resolved option,
    ``obj.options("shaping")`` all of one axis. Capabilities (``level``, ``needs_groups``,
    ``needs_ref_logp``, ``needs_token_kl``, ``needs_critic``) are read from the entries.

    Metrics (floats): ``clip_frac`` (= ``clip_frac_low`` + ``clip_frac_high``: fraction of valid
    tokens -- or of non-empty sequences for a sequence-level weight -- where the clip bound is
    active and lowers the objective, PPO/TRL convention), ``weight_mean``, ``weight_max``,
    ``ess`` (normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1] of the weights
    over the same elements), ``dual_clip_frac`` (dual_clip / position_clip), ``kl`` (token mean
    of the KL estimator, when beta > 0), ``nonfinite_dropped`` (when nonfinite="mask"), and the
    weight's own ``Weight.metrics``. With ``per_position_metrics=True`` also
    ``clip_frac_by_position``: a list of T floats, the clip fraction among valid tokens at each
    response position (sequence-level clips are broadcast to their tokens), the CTPO Fig. 1
    diagnostic.

    Numerics: per-token log-ratios are clamped to +-``log_ratio_clamp``; summed log weights
    (sequence, sequence_token) to +-``max_log_weight`` (saturating, no gradient beyond the
    bound), and the cumulative weight's detached prefix sum likewise (see ``weights.py``);
    everything is computed in float32 (float64 for float64 inputs) whatever the input dtype.
    ``nonfinite="raise"`` raises ValueError naming a tensor with NaN/inf on a valid position;
    ``"mask"`` drops those sequences (their loss is 0 and B' counts only the kept ones unless
    ``num_sequences`` is given) and reports ``nonfinite_dropped``. NaN/inf on padding is ignored.
    """

    name: str = "custom"
    weight: str = "token"
    weight_options: dict = field(default_factory=dict)
    shaping: str = "clip"
    shaping_options: dict = field(default_factory=dict)
    rule: Optional[str] = None  # for a shaping with uses_rule (weighted); ignored otherwise
    rule_options: dict = field(default_factory=dict)
    aggregation: str = "token_mean"
    aggregation_options: dict = field(default_factory=dict)
    kl_estimator: str = "k3"
    kl_estimator_options: dict = field(default_factory=dict)
    kl_placement: str = "loss"
    advantage: str = "group_norm"  # the trainer's default advantage method for this objective
    advantage_options: dict = field(default_factory=dict)
    beta: float = 0.0
    log_ratio_clamp: float = 20.0
    nonfinite: str = "raise"
    per_position_metrics: bool = False
    # sampler/trainer mismatch (mismatch.py; docs/objectives.md "Sampler/trainer mismatch")
    mismatch_level: str = "none"
    mismatch_level_options: dict = field(default_factory=dict)
    mismatch_mode: str = "truncate"
    mismatch_mode_options: dict = field(default_factory=dict)
    mismatch_normalize: str = "none"
    proximal: str = "none"

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        for f in OPTION_FIELDS:  # a private copy: the resolved options below stay valid
            object.__setattr__(self, f, dict(getattr(self, f) or {}))
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        entries = selected_entries(fields)
        placement = KL_PLACEMENTS.lookup(self.kl_placement)
        opts = {}
        for axis, fn in entries.items():
            opts[axis] = check_keyword_options(REGISTRIES[axis].kind, fields[axis], fn, fields[f"{axis}_options"])
            check_values(opts[axis])
        check_combination(fields, entries, placement)
        entries["proximal"] = check_mismatch_fields(fields)
        flat = {}
        for axis in AXES:
            for k, v in opts.get(axis, {}).items():
                flat.setdefault(k, v)
        kw = dict(opts["shaping"])
        if "rule" in entries:
            kw["rule"] = functools.partial(entries["rule"], **opts["rule"]) if opts["rule"] else entries["rule"]
        est = entries["kl_estimator"]
        cache = dict(
            _entries=entries, _opts=opts, _flat=flat, _placement=placement, _shaping_kw=kw,
            _level=entries["weight"].level, _agg_level=entries["aggregation"].level,
            _est_token_kl=bool(getattr(est, "needs_token_kl", False)),
            _est_ref_logp=bool(getattr(est, "needs_ref_logp", False)),
            _mismatch_on=entries["mismatch_level"].level is not None,
        )
        for k, v in cache.items():
            object.__setattr__(self, k, v)

    def __hash__(self):
        return hash(tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                          for k, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))))

    def __getstate__(self):  # pickle the fields only; the caches are rebuilt
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        self.__post_init__()

    def __getattr__(self, key):  # resolved options as attributes: obj.clip_low
        flat = self.__dict__.get("_flat")
        if flat is not None and key in flat:
            return flat[key]
        hint = "" if key.startswith("_") or flat is None else "; no selected axis entry declares that option"
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}{hint}")

    # ------------------------------------------------------------------ options and capabilities
    def option(self, key: str, default=None):
        """The resolved option ``key`` (given, or the entry's signature default); ``default``
        when no selected entry declares it."""
        return self._flat.get(key, default)

    def options(self, axis: str) -> dict:
        """The resolved options of one axis (``weight``, ``shaping``, ``rule``, ...)."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; valid axes: {', '.join(AXES)}")
        return dict(self._opts.get(axis, {}))

    def entry(self, axis: str):
        """The registry entry selected for ``axis`` (None for an unused rule)."""
        return self._entries.get(axis) if axis != "kl_placement" else self._placement

    @property
    def level(self) -> str:
        """'token' or 'sequence': the level of this objective's importance weight."""
        return self._level

    @property
    def loss_needs_groups(self) -> bool:
        """The loss itself needs group ids (and whole groups per call): the weight declares it."""
        return any(capability(self._entries[a], "needs_groups", self._opts[a]) for a in ("weight", "mismatch_level"))

    @property
    def uses_mismatch(self) -> bool:
        """A mismatch level is selected: behaviour_logp is read and the correction applied."""
        return self._mismatch_on

    @property
    def needs_behaviour_logp(self) -> bool:
        return self._mismatch_on or self._entries["proximal"].needs_versions

    @property
    def needs_old_logp(self) -> bool:
        """pi_old must differ from mu: a mismatch level is on and no proximal method builds pi_old."""
        return self._mismatch_on and not self._entries["proximal"].needs_versions

    @property
    def needs_policy_versions(self) -> bool:
        return bool(self._entries["proximal"].needs_versions)

    @property
    def needs_groups(self) -> bool:
        """The weight (with its options) or the advantage method needs group ids / whole groups."""
        return self.loss_needs_groups or bool(
            capability(self._entries["advantage"], "needs_groups", self._opts["advantage"]))

    @property
    def needs_ref_logp(self) -> bool:
        return self.beta > 0 and self._est_ref_logp

    @property
    def needs_token_kl(self) -> bool:
        return self.beta > 0 and self._est_token_kl

    @property
    def needs_critic(self) -> bool:
        return bool(capability(self._entries["advantage"], "needs_critic", self._opts["advantage"]))

    def with_generation_limit(self, n: int) -> "Objective":
        """A copy with ``max_tokens=n`` if the aggregation uses the generation limit and
        ``max_tokens`` was not given; else this objective."""
        if not getattr(self._entries["aggregation"], "uses_generation_limit", False):
            return self
        if self.aggregation_options.get("max_tokens") is not None:
            return self
        return self.replace(aggregation_options={**self.aggregation_options, "max_tokens": int(n)})

    def replace(self, **changes) -> "Objective":
        """A copy with some fields or options changed (e.g. ``obj.replace(beta=0.05)``,
        ``obj.replace(clip_low=0.3)``, ``obj.replace(shaping="gate")``). Flat option keys go to
        the selected entries that declare them (unknown keys raise ``ValueError``);
        ``<axis>_options`` are merged onto the current ones; changing an axis drops the options
        the new entry does not accept."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Objective(**compose(base, {}, changes, f" for objective {self.name!r}"))

    # ------------------------------------------------------------------ the call
    def __call__(self, logp, old_logp, advantages, mask, *, group_ids=None, ref_logp=None, token_kl=None,
                 num_tokens=None, num_sequences=None, return_details=False, behaviour_logp=None,
                 behaviour_version=None, policy_version=None) -> ObjectiveOutput:
        mu = corr = None
        if behaviour_logp is not None or old_logp is None or self._mismatch_on:  # mismatch.py
            old_logp, mu = resolve_old_logp(self, logp, old_logp, behaviour_logp, behaviour_version, policy_version)
        use_kl = self.beta > 0
        if not use_kl:
            ref_logp = token_kl = None  # unused: not checked, not computed
        else:
            token_kl = token_kl if self._est_token_kl else None
            ref_logp = ref_logp if self._est_ref_logp else None
            if self._est_token_kl and token_kl is None:
                raise ValueError(missing_input_message(self.kl_estimator, True))
            if self._est_ref_logp and ref_logp is None:
                raise ValueError(missing_input_message(self.kl_estimator, False))
        check_inputs(logp, old_logp, advantages, mask, group_ids, ref_logp, token_kl, num_tokens, num_sequences)
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
            logp, old_logp, advantages, ref_logp, token_kl, maskf, n_dropped = handle_nonfinite(
                self.nonfinite, logp, old_logp, advantages, ref_logp, token_kl, maskf)

        c = self.log_ratio_clamp
        info = BatchInfo(maskf, group_ids, num_tokens, num_sequences, n_dropped, c)
        delta = clamp_abs(logp.to(cd) - old_logp.to(cd), c) * maskf  # float32, clamped, 0 on padding

        entries, opts = self._entries, self._opts
        w = entries["weight"](delta, info, **opts["weight"])
        x = torch.exp(w.log_w)
        A = advantages.to(cd)
        if self._level == "token":
            A_el = A[:, None] if A.dim() == 1 else A
        else:
            A_el = A if A.dim() == 1 else info.seq_mean(A)  # one advantage per sequence
        shaped = entries["shaping"](x, A_el, w, info, **self._shaping_kw)
        L = shaped.loss
        if mu is not None:  # the detached correction pi_old/mu multiplies the policy-gradient term
            corr = correction(self, old_logp, mu, info, cd)
            L = apply_correction(L, corr)

        # KL: beta * estimator, placed in the loss (KL_PLACEMENTS)
        kl_tok = kl_add = kl_extra = None
        if use_kl:
            kl_tok = entries["kl_estimator"](logp, ref_logp, token_kl, info, **opts["kl_estimator"])
            if self._placement.needs_sequence_weight:
                # SNIB Alg. 1 line 11: K = (1/B') sum_i w_i * mean_t kl_it, same weight w as the policy term
                K = info.seq_mean(kl_tok)
                kl_extra = self.beta * (x * K * info.seq_valid).sum() / info.num_sequences
            else:
                x_tok = x if self._level == "token" else x[:, None]
                kl_add = self.beta * self._placement(kl_tok, x_tok)

        agg = entries["aggregation"]
        if self._agg_level == "token":
            L_tok = L if self._level == "token" or L.dim() == 2 else L[:, None]
            if kl_add is not None:
                L_tok = L_tok + kl_add
            loss = agg(L_tok, info, **opts["aggregation"])
        else:
            if self._level == "token" or L.dim() == 2:
                L_seq = info.seq_mean(L) if L.dim() == 2 else L
            else:
                L_seq = L * info.seq_valid  # empty / dropped responses contribute 0
            if kl_add is not None:
                L_seq = L_seq + info.seq_mean(kl_add)  # TRL GSPO: the sequence's mean token KL
            loss = agg(L_seq, info, **opts["aggregation"])
        if kl_extra is not None:
            loss = loss + kl_extra

        metrics = self._metrics(x, w, shaped, info, kl_tok, n_dropped, corr)
        details = self._details(x, w, shaped, info, kl_tok, corr) if return_details else None
        return ObjectiveOutput(loss, metrics, details)

    @torch.no_grad()
    def _metrics(self, x, w, shaped, info, kl_tok, n_dropped, corr=None):
        level = self._level
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
        floats = {}
        for k, v in {**(w.metrics or {}), **(corr.metrics if corr else {})}.items():  # weight's, mismatch
            if isinstance(v, torch.Tensor):
                vals.append(v.detach().to(xm.dtype).reshape(()))
                keys.append(k)
            else:
                floats[k] = float(v)
        out = dict(zip(keys, torch.stack(vals).tolist()))
        out.update(floats)
        out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
        if self.nonfinite == "mask":
            out["nonfinite_dropped"] = float(n_dropped)
        if self.per_position_metrics:
            clipped = _clipped_by_token(xv, shaped, level, info)
            out["clip_frac_by_position"] = (clipped.sum(0) / info.mask.sum(0).clamp_min(1.0)).tolist()
        return out

    @torch.no_grad()
    def _details(self, x, w, shaped, info, kl_tok, corr=None) -> ObjectiveDetails:
        xv = x.detach()
        mb = info.mask_bool if self._level == "token" else info.seq_valid

        def valid(c):
            return None if c is None else torch.broadcast_to(c, xv.shape) & mb

        return ObjectiveDetails(
            weight=xv, log_weight=w.log_w.detach(), level=self._level, mask=info.mask,
            clipped_low=valid(shaped.clipped_low), clipped_high=valid(shaped.clipped_high),
            clipped_dual=valid(shaped.clipped_dual), clipped_by_token=_clipped_by_token(xv, shaped, self._level, info),
            token_kl=None if kl_tok is None else kl_tok.detach(), correction=None if corr is None else corr.c)


def _clipped_by_token(xv, shaped, level, info):
    """(B, T) float 0/1: valid tokens where the low or the high bound is active (a sequence's clip
    is broadcast to its tokens)."""
    clipped = torch.zeros_like(xv)
    for c in (shaped.clipped_low, shaped.clipped_high):
        if c is not None:
            clipped = clipped + c
    if level == "sequence":
        clipped = clipped[:, None]
    return clipped * info.mask


def objective(name: str, **overrides) -> Objective:
    """The preset ``name`` with some fields or options overridden.

    ``objective("snib", clip_low=0.2, beta=0.1)``; ``objective("grpo", weight="cumulative")``;
    ``objective("ctpo", shaping_options={"pos_power": 0.7})``. Flat option keys go to the selected
    entries that declare them; the preset's own flat defaults that no selected entry declares are
    dropped. Unknown names or keys raise ``ValueError`` listing the valid ones.
    """
    preset = PRESETS.lookup(name)
    base = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(Objective)}
    base["name"] = name
    preset_flat = {}
    for k, v in preset.fields.items():
        if k in base:
            base[k] = v
        else:
            preset_flat[k] = v
    return Objective(**compose(base, preset_flat, overrides, f" for objective {name!r}"))


def available_objectives() -> list[str]:
    """Sorted list of preset names."""
    return PRESETS.names()


__all__ = ["Objective", "ObjectiveOutput", "ObjectiveDetails", "objective", "available_objectives"]
