"""ratiorl.objectives: importance-sampling policy-gradient objectives behind one composable API
(docs/objectives.md).

    obj = objective("snib", beta=0.1)                 # a frozen ``Objective``
    out = obj(logp, old_logp, A, mask, group_ids=g, token_kl=kl)
    out.loss.backward(); out.metrics

Axes are registries (``WEIGHTS``, ``SHAPINGS``, ``RULES``, ``AGGREGATIONS``, ``KL_ESTIMATORS``,
``KL_PLACEMENTS``, ``ADVANTAGES``, ``PRESETS``, and for the sampler/trainer mismatch ``MISMATCH_LEVELS``,
``MISMATCH_MODES``, ``PROXIMALS``, and ``TOKEN_SELECTIONS``); a new loss is one registered function whose
keyword-only parameters are its options and whose ``register(...)`` keywords are its capabilities.
"""

from .._registry import Registry
from .advantages import ADVANTAGES, advantages
from .aggregate import AGGREGATIONS
from .core import Objective, ObjectiveDetails, ObjectiveOutput, available_objectives, objective
from .kl import KL_ESTIMATORS, KL_PLACEMENTS, AdaptiveBeta, FixedBeta, PrimalDualBeta
from .mismatch import MISMATCH_LEVELS, MISMATCH_MODES, PROXIMALS, ModeResult
from .presets import PRESETS, register_preset
from .selection import TOKEN_SELECTIONS, Selection, SelectionInputs
from .shaping import RULES, SHAPINGS, Shaped
from .weights import WEIGHTS, Weight

__all__ = [
    "objective", "available_objectives", "advantages", "Objective", "ObjectiveOutput", "ObjectiveDetails",
    "Weight", "Shaped",
    "FixedBeta", "PrimalDualBeta", "AdaptiveBeta",
    "WEIGHTS", "SHAPINGS", "RULES", "AGGREGATIONS", "KL_ESTIMATORS", "KL_PLACEMENTS", "ADVANTAGES",
    "PRESETS", "register_preset", "Registry", "MISMATCH_LEVELS", "MISMATCH_MODES", "PROXIMALS", "ModeResult",
    "TOKEN_SELECTIONS", "Selection", "SelectionInputs",
]
