"""Per-axis options of an objective: which entries are selected, what options they declare,
how flat keys (``clip_low=0.3``) are routed to them, and the range checks keyed by option name.

An entry's options are its keyword-only parameters with defaults (``ratiorl._registry.
keyword_options``); ``Objective.<axis>_options`` holds only the options given explicitly, and the
resolved options are the signature defaults updated with them.
"""

from __future__ import annotations

from .._registry import did_you_mean, keyword_options
from .advantages import ADVANTAGES
from .aggregate import AGGREGATIONS
from .kl import KL_ESTIMATORS
from .mismatch import MISMATCH_LEVELS, MISMATCH_MODES, check_mismatch_options
from .selection import TOKEN_SELECTIONS
from .shaping import RULES, SHAPINGS
from . import surrogates  # noqa: F401  (registers GMPO, DPPO, VESPO and log-prob shapings)
from .weights import WEIGHTS

# axes with options, in routing order (a flat key goes to every selected entry that declares it)
AXES = ("weight", "shaping", "rule", "aggregation", "kl_estimator", "advantage", "mismatch_level", "mismatch_mode",
        "token_selection")
REGISTRIES = {"weight": WEIGHTS, "shaping": SHAPINGS, "rule": RULES, "aggregation": AGGREGATIONS,
              "kl_estimator": KL_ESTIMATORS, "advantage": ADVANTAGES,
              "mismatch_level": MISMATCH_LEVELS, "mismatch_mode": MISMATCH_MODES,
              "token_selection": TOKEN_SELECTIONS}
OPTION_FIELDS = tuple(f"{a}_options" for a in AXES)
SCALARS = ("kl_placement", "beta", "log_ratio_clamp", "nonfinite", "per_position_metrics",
           "mismatch_normalize", "proximal", "entropy_coef")
PLAIN_FIELDS = AXES + SCALARS  # fields set directly by objective(**kw) / replace(**kw)


def declared(fn) -> tuple[dict, bool]:
    """({option: default}, takes_any) of one entry."""
    return keyword_options(fn)


def selected_entries(fields: dict) -> dict:
    """{axis: entry} for the selected entries (the rule only when the shaping ``uses_rule``).
    Unknown names raise ``ValueError`` listing the valid ones."""
    out = {}
    for axis in AXES:
        name = fields[axis]
        if axis == "rule":
            if not getattr(out["shaping"], "uses_rule", False):
                continue
            if name is None:
                raise ValueError(f"shaping={fields['shaping']!r} needs rule=...; valid rules: {', '.join(RULES.names())}")
        out[axis] = REGISTRIES[axis].lookup(name)
    return out


def route(entries: dict, flat: dict, strict: bool, context: str = "") -> dict:
    """{axis: {key: value}} for the flat keys each selected entry declares. With ``strict`` a key
    no selected entry declares raises ``ValueError`` naming the valid keys (closest suggested)."""
    routed = {axis: {} for axis in entries}
    unknown = []
    for k, v in flat.items():
        hit = False
        for axis, fn in entries.items():
            if k in declared(fn)[0]:
                routed[axis][k] = v
                hit = True
        if not hit:
            unknown.append(k)
    if unknown and strict:
        valid = list(PLAIN_FIELDS + OPTION_FIELDS)
        for fn in entries.values():
            valid += [k for k in declared(fn)[0] if k not in valid]
        raise ValueError(
            f"unknown objective key(s) {sorted(unknown)}{context}{did_you_mean(sorted(unknown), valid)}; "
            f"valid keys: {', '.join(valid)}")
    return routed


def compose(base: dict, preset_flat: dict, changes: dict, context: str = "") -> dict:
    """The field values of an objective: ``base`` (field -> value) changed by ``changes``
    (fields, ``<axis>_options`` merged onto the current ones, or flat option keys). When an axis
    changes, the options its new entry does not accept are dropped; ``preset_flat`` (a preset's
    flat defaults) is routed to the selected entries and silently dropped where none declares it."""
    fields = dict(base)
    flat = {}
    for k, v in changes.items():
        if k in PLAIN_FIELDS or k == "name":
            fields[k] = v
        elif k not in OPTION_FIELDS:
            flat[k] = v
    entries = selected_entries(fields)
    for axis, fn in entries.items():
        f = f"{axis}_options"
        accepted, takes_any = declared(fn)
        fields[f] = {k: v for k, v in (fields.get(f) or {}).items() if takes_any or k in accepted}
    for routed in (route(entries, preset_flat, False), None, route(entries, flat, True, context)):
        if routed is None:  # explicit <axis>_options, between the preset's and the user's flat keys
            routed = {a: dict(changes.get(f"{a}_options") or {}) for a in AXES}
        for axis, opts in routed.items():
            if opts:
                fields[f"{axis}_options"] = {**(fields.get(f"{axis}_options") or {}), **opts}
    return fields


def _bad(cond, msg):
    if cond:
        raise ValueError(msg)


def check_values(o: dict) -> None:
    """Range checks keyed by option name, on the resolved options of one entry."""
    check_mismatch_options(o)  # mismatch_low / mismatch_high / mismatch_divergence / mismatch_scope
    if "clip_low" in o:
        v = o["clip_low"]
        _bad(v is not None and not 0.0 <= v < 1.0, f"clip_low must be in [0, 1) or None, got {v}")
    if "clip_high" in o:
        v = o["clip_high"]
        _bad(v is not None and not v >= 0, f"clip_high must be >= 0 or None, got {v}")
    if "dual_clip" in o:
        v = o["dual_clip"]
        _bad(not v > 1.0, f"dual_clip must be > 1 (it caps the loss of negative-advantage tokens at -c*A), got {v}")
    if "tau_pos" in o or "tau_neg" in o:
        p, n = o.get("tau_pos", 1.0), o.get("tau_neg", 1.0)
        _bad(not (p > 0 and n > 0), f"tau_pos and tau_neg must be > 0, got {p}, {n}")
    if "max_log_weight" in o:
        _bad(not o["max_log_weight"] > 0, "log_ratio_clamp and max_log_weight must be > 0")
    if "max_tokens" in o:
        v = o["max_tokens"]
        _bad(v is not None and not v > 0, f"max_tokens must be a positive int or None, got {v}")
    if "normalize_scope" in o:
        v = o["normalize_scope"]
        _bad(v not in ("group", "batch"), f"normalize_scope must be 'group' or 'batch', got {v!r}")
    for k in ("log_clip_low", "log_clip_high", "div_low", "div_high", "clip_cov_ratio", "kl_cov_ratio",
              "lambda_pos", "lambda_neg", "dro_beta", "ppo_kl_coef"):
        if k in o:
            _bad(not o[k] >= 0, f"{k} must be >= 0, got {o[k]}")
    if "trunc_c" in o:
        _bad(not o["trunc_c"] > 0, f"trunc_c must be > 0, got {o['trunc_c']}")
    if "top_entropy_quantile" in o:
        v = o["top_entropy_quantile"]
        _bad(not 0.0 < v <= 1.0, f"top_entropy_quantile must be in (0, 1] (the fraction of tokens kept), got {v}")
    if "clip_cov_lb" in o:
        _bad(not o["clip_cov_lb"] < o["clip_cov_ub"], f"clip_cov_lb must be < clip_cov_ub, got {o['clip_cov_lb']}, "
             f"{o['clip_cov_ub']}")
    if o.get("max_kl") is not None:
        _bad(not o["max_kl"] > 0, f"max_kl must be > 0 or None, got {o['max_kl']}")
    if "n" in o or "m" in o:  # DGPO eq. 9-10 exponents
        n, m = o.get("n", 1.0), o.get("m", 1.0)
        _bad(not (n > 0 and m > 0), f"dgpo needs n > 0 and m > 0, got n={n}, m={m}")


def capability(fn, attr: str, options: dict, default=False):
    """An entry's declared capability; a callable attribute is evaluated on the resolved options."""
    v = getattr(fn, attr, default)
    return v(options) if callable(v) else v


def check_combination(fields: dict, entries: dict, placement) -> None:
    """Combinations of axes that have no meaning, said with the reason (read from capabilities)."""
    w, s = entries["weight"], entries["shaping"]
    if getattr(s, "requires_token_level", False) and w.level != "token":
        raise ValueError(
            f"shaping={fields['shaping']!r} clips each token by its position, but weight={fields['weight']!r} is one "
            "value per sequence, so there is no per-position ratio to clip; use a token-level weight "
            f"({', '.join(k for k, f in WEIGHTS.items() if f.level == 'token')}) or shaping='clip'"
        )
    if fields["beta"] > 0 and getattr(placement, "needs_sequence_weight", False) and w.level != "sequence":
        raise ValueError(
            f"kl_placement={fields['kl_placement']!r} weights each sequence's mean KL by its sequence weight "
            f"(SNIB Alg. 1 line 11), but weight={fields['weight']!r} is per token; use a sequence-level weight "
            f"({', '.join(k for k, f in WEIGHTS.items() if f.level == 'sequence')}) or kl_placement='loss_is'"
        )
    if fields["nonfinite"] not in ("raise", "mask"):
        raise ValueError(f"nonfinite must be 'raise' or 'mask', got {fields['nonfinite']!r}")
    if not fields["entropy_coef"] >= 0:
        raise ValueError(f"entropy_coef must be >= 0 (the bonus -entropy_coef * H is subtracted), got {fields['entropy_coef']}")
    if not fields["beta"] >= 0:  # also NaN
        raise ValueError(f"beta must be >= 0, got {fields['beta']}")
    if not fields["log_ratio_clamp"] > 0:
        raise ValueError("log_ratio_clamp and max_log_weight must be > 0")


__all__ = ["AXES", "REGISTRIES", "OPTION_FIELDS", "SCALARS", "PLAIN_FIELDS", "declared", "selected_entries",
           "route", "compose", "check_values", "capability", "check_combination"]
