"""The five stages of an RL step, each reading and extending one ``ratiorl.rollout.Rollout``:
``sample -> score -> advantages -> update -> report``."""

from .advantages import CriticAdvantages, GroupAdvantages
from .report import Report
from .sample import PromptStream, Sample
from .score import Score
from .update import Update

__all__ = ["Sample", "PromptStream", "Score", "GroupAdvantages", "CriticAdvantages", "Update", "Report"]
