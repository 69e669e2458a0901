"""ratiorl.rollout: generation engines behind one interface (RolloutEngine)."""

from .engine import HFRolloutEngine, RolloutBatch, RolloutEngine, merged_state_dict

__all__ = ["RolloutBatch", "RolloutEngine", "HFRolloutEngine", "merged_state_dict"]
