"""ratiorl.objectives: every policy-gradient objective of SPEC.md behind one composable API.

    obj = objective("snib", beta=0.1)                 # a frozen ``Objective``
    out = obj(logp, old_logp, A, mask, group_ids=g, token_kl=kl)
    out.loss.backward(); out.metrics

Axes are registries (``WEIGHTS``, ``SHAPINGS``, ``RULES``, ``AGGREGATIONS``, ``KL_ESTIMATORS``,
``KL_PLACEMENTS``, ``ADVANTAGES``, ``PRESETS``); a new loss is one registered function.
"""

from .._registry import Registry
from .advantages import ADVANTAGES, advantages
from .aggregate import AGGREGATIONS
from .core import Objective, ObjectiveOutput, available_objectives, objective
from .kl import KL_ESTIMATORS, KL_PLACEMENTS, AdaptiveBeta, FixedBeta, PrimalDualBeta
from .presets import PRESETS, register_preset
from .shaping import RULES, SHAPINGS
from .weights import WEIGHTS

__all__ = [
    "objective", "available_objectives", "advantages", "Objective", "ObjectiveOutput",
    "FixedBeta", "PrimalDualBeta", "AdaptiveBeta",
    "WEIGHTS", "SHAPINGS", "RULES", "AGGREGATIONS", "KL_ESTIMATORS", "KL_PLACEMENTS", "ADVANTAGES",
    "PRESETS", "register_preset", "Registry",
]
