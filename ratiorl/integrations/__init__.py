"""ratiorl.integrations: ratiorl objectives inside other training libraries.

``RatioGRPOTrainer`` (TRL's GRPOTrainer with a ratiorl loss, see ``ratiorl.integrations.trl``)
is imported lazily: ``import ratiorl.integrations`` does not import TRL.
``ratiorl.integrations.verl`` registers every objective as a verl policy loss ``ratiorl.<preset>``;
verl imports it itself through the ``verl.plugins`` entry point (docs/verl.md).
"""

__all__ = ["RatioGRPOTrainer"]


def __getattr__(name):
    if name == "RatioGRPOTrainer":
        from .trl import RatioGRPOTrainer  # ImportError naming `pip install 'ratiorl[trl]'` without TRL

        return RatioGRPOTrainer
    raise AttributeError(f"module 'ratiorl.integrations' has no attribute {name!r}")
