"""The composed objective: ``Objective`` (frozen dataclass), ``objective(name, **overrides)``.

One call runs the axes in order (docs/objectives.md)::

    delta  = clamp(logp - old_logp, -20, 20) * mask            (float32)
    w      = WEIGHTS[weight](delta, info, **weight_options)     log weight, token- or sequence-level
    L      = SHAPINGS[shaping](exp(log w), A, w, info, **shaping_options)   per-element loss
    L      = L * keep + extra                                   (TOKEN_SELECTIONS: selection.py)
    L     += beta * KL placement                                (KL_ESTIMATORS, KL_PLACEMENTS)
    loss   = AGGREGATIONS[aggregation](L, info, **aggregation_options) - entropy_coef * H

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
from .metrics import ObjectiveDetails, call_details, call_metrics
from .mismatch import apply_correction, check_mismatch_fields, correction, resolve_old_logp
from .options import AXES, OPTION_FIELDS, REGISTRIES, capability, check_combination, check_values, compose, selected_entries
from .presets import PRESETS
from .selection import SelectionInputs, check_entropy, entropy_term


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
    # token selection (selection.py) and entropy bonus (docs/objectives.md "Token selection")
    token_selection: str = "none"
    token_selection_options: dict = field(default_factory=dict)
    entropy_coef: float = 0.0

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
            _sel_on=not getattr(entries["token_selection"], "identity", False),
            _sel_mu=bool(getattr(entries["token_selection"], "reads_behaviour_logp", False)),
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
    def needs_entropy(self) -> bool:
        """The call needs ``entropy=`` (B, T): entropy_coef > 0 or the token selection declares needs_entropy."""
        return self.entropy_coef > 0 or bool(getattr(self._entries["token_selection"], "needs_entropy", False))

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
                 behaviour_version=None, policy_version=None, entropy=None) -> ObjectiveOutput:
        mu = corr = keep = None
        mu_sel = behaviour_logp if self._sel_mu else None  # OPSM reads the sampler's log-probs
        if mu_sel is not None and old_logp is not None and not self._mismatch_on and not self._entries["proximal"].needs_versions:
            behaviour_logp = None  # read by the selection only; nothing to correct
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
        if self.needs_entropy:
            if entropy is None:
                raise ValueError("this objective needs entropy= (B, T), the per-token entropy of the policy "
                                 f"(entropy_coef={self.entropy_coef}, token_selection={self.token_selection!r})")
            check_entropy(entropy, logp)
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
        info.old_logp = old_logp.to(cd)
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
        if self._sel_on:  # token selection: L * keep + extra (selection.py)
            L, keep = self._select(L, logp, delta, A, shaped, entropy, mu_sel if mu_sel is not None else old_logp, info, cd)
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
            L_tok = L if L.dim() == 2 else L[:, None]
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
        ent = None
        if entropy is not None and self.entropy_coef > 0:  # entropy bonus: - coef * H, H by the same aggregation
            ent = entropy_term(torch.where(info.mask_bool, entropy.to(cd), 0.0), agg, self._agg_level, info,
                               opts["aggregation"])
            loss = loss - self.entropy_coef * ent

        metrics = call_metrics(self, x, w, shaped, info, kl_tok, n_dropped, corr, keep, ent)
        details = call_details(self, x, w, shaped, info, kl_tok, corr) if return_details else None
        return ObjectiveOutput(loss, metrics, details)


    def _select(self, L, logp, delta, A, shaped, entropy, sampling_logp, info, cd):
        """(L * keep + extra, keep) of the token selection."""
        with torch.no_grad():
            inp = SelectionInputs(logp.detach().to(cd), delta, A if A.dim() == 2 else A[:, None],
                                  shaped, None if entropy is None else entropy.detach().to(cd), sampling_logp.detach().to(cd))
        sel = self._entries["token_selection"](inp, info, **self._opts["token_selection"])
        if sel.keep is not None:
            keep = sel.keep.detach()
            if L.dim() == 1:
                L = L[:, None] if keep.shape[-1] != 1 else L
                keep = keep.reshape(-1) if keep.shape[-1] == 1 else keep
            L = L * keep
        if sel.extra is not None:
            L = (L if L.dim() == 2 else L[:, None]) + sel.extra
        return L, sel.keep


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
