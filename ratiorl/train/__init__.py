"""ratiorl.train: typed run config, the RL trainer loop, checkpoint/resume, supervised warm start.

    from ratiorl.train import load_config, train, Trainer
    cfg = load_config("examples/snib.yaml", ["--objective.beta", "0.05"])
    summary = train(cfg)                     # whole run -> summary dict (summary.json)

    trainer = Trainer(cfg)                   # or step by step (benchmarks, notebooks)
    metrics = trainer.step()                 # one rollout batch + its updates -> dict of floats
    trainer.close()
"""

from .config import (
    CheckpointConfig,
    CriticConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
    TrainLoopConfig,
    config_from_dict,
    load_config,
    save_config,
)
from .sft import SFTConfig, run_sft, sft_train
from .trainer import Trainer, train

__all__ = [
    "TrainConfig", "ModelConfig", "LoraConfig", "RolloutConfig", "TaskConfig", "RewardConfig",
    "ObjectiveConfig", "CriticConfig", "OptimConfig", "TrainLoopConfig", "EvalConfig",
    "CheckpointConfig", "LoggingConfig", "load_config", "config_from_dict", "save_config",
    "Trainer", "train", "SFTConfig", "run_sft", "sft_train",
]
