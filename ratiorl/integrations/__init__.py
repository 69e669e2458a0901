"""ratiorl.integrations: ratiorl objectives inside other training libraries.

``RatioGRPOTrainer`` (TRL's GRPOTrainer with a ratiorl loss, see ``ratiorl.integrations.trl``)
is imported lazily: ``import ratiorl.integrations`` does not import TRL.
"""

__all__ = ["RatioGRPOTrainer"]


def __getattr__(name):
    if name == "RatioGRPOTrainer":
        from .trl import RatioGRPOTrainer  # ImportError naming `pip install 'ratiorl[trl]'` without TRL

        return RatioGRPOTrainer
    raise AttributeError(f"module 'ratiorl.integrations' has no attribute {name!r}")
