"""ratiorl.rollout: the typed batch (``Rollout``) and generation engines behind one interface (``RolloutEngine``)."""

from .batch import Rollout
from .engine import HFRolloutEngine, RolloutEngine, merged_state_dict

__all__ = ["Rollout", "RolloutEngine", "HFRolloutEngine", "merged_state_dict"]
