import pytest
import torch

from ratiorl.train import load_config


def tiny_overrides(model_dir, out_dir, **kw):
    """Seconds-scale settings. Reward noise gives a random-init model non-zero advantages."""
    base = {
        "model.path": model_dir,
        "out_dir": out_dir,
        "rollout.prompts_per_step": 4,
        "rollout.num_generations": 4,
        "rollout.max_new_tokens": 4,
        "reward.noise_sigma": 1.0,
        "optim.lr": 1e-2,
        "train.steps": 1,
        "eval.every": 0,
        "eval.before": False,
        "eval.num_prompts": 4,
        "eval.k": 2,
        "eval.greedy": False,
        "checkpoint.every": 0,
        "checkpoint.save_hf": False,
        "checkpoint.save_final_model": False,
        "logging.progress": False,
        "logging.tensorboard": False,
        "logging.plots": False,
        "task.options": "{n_train: 64, n_eval: 16}",
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    def make(**kw):
        out = kw.pop("out_dir", str(tmp_path / "run"))
        return load_config(None, tiny_overrides(tiny_model_dir, out, **kw))

    return make


def trainable_snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
