"""ratiorl: RL post-training of language models with principled importance sampling.

The objective API is re-exported here (formulas in docs/objectives.md)::

    import ratiorl
    obj = ratiorl.objective("snib", beta=0.1)
    out = obj(logp, old_logp, advantages, mask, group_ids=g, token_kl=kl)

Sub-packages (``ratiorl.policy``, ``ratiorl.train``, ...) are imported lazily so that
``import ratiorl`` stays cheap.
"""

__version__ = "0.1.0"

_OBJECTIVE_EXPORTS = (
    "objective",
    "available_objectives",
    "advantages",
    "Objective",
    "ObjectiveOutput",
    "FixedBeta",
    "PrimalDualBeta",
    "AdaptiveBeta",
)

__all__ = list(_OBJECTIVE_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _OBJECTIVE_EXPORTS:
        from . import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module 'ratiorl' has no attribute {name!r}")
