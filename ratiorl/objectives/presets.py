"""Named objectives (docs/objectives.md, "presets"): each preset is only a set of defaults.

Add one with ``register_preset("name", source="...", weight=..., shaping=..., clip_low=...)``:
axis names and ``Objective`` fields, plus flat options (``clip_low``, ``n``, ...) that
``objective()`` routes to the selected entries that declare them (and drops where none does, so
``objective("ctpo", shaping="dual_clip")`` works). Everything not given keeps its default. ``advantage`` is the method the
trainer uses by default for this objective (``ratiorl.advantages(..., method=obj.advantage)``).
"""

from __future__ import annotations

from typing import NamedTuple

from .._registry import Registry

PRESETS = Registry("objective")


class Preset(NamedTuple):
    name: str
    source: str
    fields: dict


def register_preset(name: str, source: str = "", **fields) -> Preset:
    if name in PRESETS:
        raise ValueError(f"objective {name!r} is already registered")
    PRESETS[name] = Preset(name, source, fields)
    return PRESETS[name]


_CLIP = dict(shaping="clip", clip_low=0.2, clip_high=0.2)

register_preset("reinforce", "REINFORCE (tutorial sec. 2-3)", weight="token", shaping="none",
                aggregation="seq_mean_token_mean", advantage="group_mean")
register_preset("ppo", "PPO (tutorial sec. 5.3), dual clip", weight="token", shaping="dual_clip",
                clip_low=0.2, clip_high=0.2, dual_clip=3.0, aggregation="token_mean", advantage="gae")
register_preset("grpo", "GRPO (tutorial sec. 6)", weight="token", **_CLIP,
                aggregation="seq_mean_token_mean", advantage="group_norm", beta=0.04,
                kl_estimator="k3", kl_placement="loss")
register_preset("bnpo", "BNPO (TRL loss_type='bnpo')", weight="token", **_CLIP,
                aggregation="token_mean", advantage="group_norm")
register_preset("dr_grpo", "Dr.GRPO (tutorial sec. 7.1-7.2)", weight="token", **_CLIP,
                aggregation="seq_mean_token_sum_norm", advantage="group_mean")
register_preset("dapo", "DAPO clip-higher + token-level loss (tutorial sec. 7.2)", weight="token",
                shaping="clip", clip_low=0.2, clip_high=0.28, aggregation="token_mean",
                advantage="group_norm")
register_preset("gspo", "GSPO (tutorial sec. 7.4)", weight="geometric", shaping="clip",
                clip_low=3e-4, clip_high=4e-4, aggregation="sequence", advantage="group_norm")
register_preset("gspo_token", "GSPO-token (tutorial sec. 7.4)", weight="geometric_token",
                shaping="clip", clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean_token_mean",
                advantage="group_norm")
register_preset("sapo", "SAPO soft gate (tutorial sec. 7.5)", weight="token", shaping="gate",
                tau_pos=1.0, tau_neg=1.05, aggregation="seq_mean_token_mean", advantage="group_norm")
register_preset("cispo", "CISPO (DGPO eq. 3; MiniMax-M1)", weight="token", shaping="weighted",
                rule="cispo", clip_low=None, clip_high=4.0, aggregation="token_mean",
                advantage="group_norm")
register_preset("gppo", "GPPO (DGPO eq. 4)", weight="token", shaping="weighted", rule="gppo",
                clip_low=0.2, clip_high=0.2, aggregation="token_mean", advantage="group_norm")
register_preset("ce_gppo", "CE-GPPO (DGPO eq. 5)", weight="token", shaping="weighted",
                rule="ce_gppo", clip_low=0.2, clip_high=0.2, beta1=0.75, beta2=1.0,
                aggregation="token_mean", advantage="group_norm")
register_preset("aspo", "ASPO (DGPO eq. 6, our reading)", weight="token", shaping="weighted",
                rule="aspo", clip_low=0.2, clip_high=0.2, aspo_clip_low=0.33, aspo_clip_high=3.0,
                aggregation="token_mean", advantage="group_norm")
register_preset("dgpo", "DGPO (DGPO eq. 9-10)", weight="token", shaping="weighted", rule="dgpo",
                clip_low=0.2, clip_high=0.2, n=1.0, m=2.0, aggregation="token_mean",
                advantage="group_norm")
_SNIB_KL = dict(beta=0.1, kl_estimator="exact", kl_placement="is_weighted")
register_preset("vanilla_is", "sequence IS (SNIB ablation)", weight="sequence", **_CLIP,
                aggregation="sequence", advantage="group_mean", **_SNIB_KL)
register_preset("snib", "SNIB-sg (SNIB Alg. 1)", weight="self_normalized", **_CLIP,
                aggregation="sequence", advantage="group_mean", **_SNIB_KL)
register_preset("snib_fg", "SNIB-fg (SNIB App. C.4)", weight="self_normalized_fg", **_CLIP,
                aggregation="sequence", advantage="group_mean", **_SNIB_KL)
register_preset("ctpo", "CTPO (CTPO Prop. 1, sec. 3.3)", weight="cumulative",
                shaping="position_clip", pos_clip_low=0.025, pos_clip_high=0.05, pos_power=0.5,
                pos_dual_clip=0.05, aggregation="token_mean", advantage="group_norm")
register_preset("ctpo_fixed", "CTPO with a fixed clip (CTPO Table 3 ablation)", weight="cumulative",
                shaping="dual_clip", clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                aggregation="token_mean", advantage="group_norm")

# ---- policy losses of verl 0.9.1 and TRL 1.16 (docs/objectives.md, "Coming from verl / coming from TRL") ----
register_preset("gmpo", "GMPO (Zhao et al. 2025, arXiv:2507.20673 eq. 5; verl loss_mode='geo_mean')",
                weight="token", shaping="geo_mean", log_clip_low=0.4, log_clip_high=0.4, aggregation="sequence",
                advantage="group_norm")
register_preset("dppo_tv", "DPPO-Binary-TV (arXiv:2602.04879; verl loss_mode='dppo_tv')", weight="token",
                shaping="dppo_tv", div_low=0.2, div_high=0.2, trunc_c=20.0, aggregation="token_mean",
                advantage="group_norm")
register_preset("dppo_kl", "DPPO-Binary-KL (arXiv:2602.04879; verl loss_mode='dppo_kl')", weight="token",
                shaping="dppo_kl", div_low=0.2, div_high=0.2, trunc_c=20.0, aggregation="token_mean",
                advantage="group_norm")
register_preset("clip_cov", "Clip-Cov (Cui et al. 2025, arXiv:2505.22617 sec. 4.2; verl loss_mode='clip_cov')",
                weight="token", **_CLIP, token_selection="clip_cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0,
                clip_cov_ub=5.0, aggregation="token_mean", advantage="group_norm")
register_preset("kl_cov", "KL-Cov (Cui et al. 2025, arXiv:2505.22617 sec. 4.2; verl loss_mode='kl_cov')",
                weight="token", shaping="none", token_selection="kl_cov", kl_cov_ratio=2e-4, ppo_kl_coef=1.0,
                aggregation="token_mean", advantage="group_norm")
register_preset("luspo", "LUSPO (arXiv:2602.05261; TRL loss_type='luspo')", weight="geometric", shaping="clip",
                clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean_token_sum", advantage="group_norm")
register_preset("vespo", "VESPO (arXiv:2602.10693; TRL loss_type='vespo')", weight="token", shaping="gamma",
                k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, aggregation="token_mean",
                advantage="group_norm")

# VAPO: clip-higher, token-level loss, length-adaptive GAE for the policy and lambda 1 (Monte Carlo)
# for the critic's returns; value pretraining (critic.pretrain_steps) and the NLL term on correct
# samples (train.nll_coef) are trainer settings (examples/vapo.yaml sets both)
register_preset("vapo", "VAPO (tutorial sec. 7.3; VAPO arXiv 2504.05118)", weight="token", shaping="clip",
                clip_low=0.2, clip_high=0.28, aggregation="token_mean", advantage="gae_length_adaptive",
                alpha=0.05, critic_lam=1.0)

__all__ = ["PRESETS", "Preset", "register_preset"]
