"""ratiorl.rollout: the typed batch (``Rollout``) and generation engines behind one interface (``RolloutEngine``)."""

from .batch import Rollout
from .engine import HFRolloutEngine, RolloutEngine, merged_state_dict
from .truncation import sampling_options

__all__ = ["HFRolloutEngine", "Rollout", "RolloutEngine", "merged_state_dict", "sampling_options"]
