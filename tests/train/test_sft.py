"""Supervised warm start: label masking, loss goes down, early stop, pinned threads."""

import json
import os

import torch

from ratiorl.train.sft import SFTConfig, make_sft_batch, run_sft, sft_train


def test_batch_trains_only_completion_and_eos():
    from ratiorl.policy import make_char_tokenizer

    tok = make_char_tokenizer()
    ids, mask, labels = make_sft_batch(tok, [{"prompt": "1+2=", "answer": "3"},
                                             {"prompt": "10+20=", "answer": "30", "completion": "30"}])
    assert ids.shape == mask.shape == labels.shape == (2, 9)
    assert labels[0].tolist()[:4] == [-100] * 4 and labels[0, 5] == tok.eos_token_id
    assert (labels[0, 6:] == -100).all() and mask[0].tolist() == [1] * 6 + [0] * 3
    assert tok.decode([t for t in labels[1].tolist() if t >= 0], skip_special_tokens=True) == "30"


def test_loss_goes_down_and_stop_ends_training(tmp_path):
    from ratiorl.policy import make_tiny_model

    model, tok = make_tiny_model(n_layer=1, n_head=2, n_embd=32, seed=0)
    examples = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]
    losses = sft_train(model, tok, examples, steps=40, batch_size=8, lr=1e-2, warmup_steps=2, seed=0)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    calls = []
    losses = sft_train(model, tok, examples, steps=40, batch_size=8, lr=1e-3, seed=0,
                       stop=lambda step: calls.append(step) or step >= 10, check_every=5)
    assert calls == [5, 10] and len(losses) == 10


def test_run_sft_is_deterministic_and_restores_threads(tmp_path):
    cfg = SFTConfig(steps=4, batch_size=4, model_sizes={"n_layer": 1, "n_head": 2, "n_embd": 32},
                    task_options={"n_train": 50, "n_eval": 10}, target_accuracy=0.99, check_every=2, check_prompts=5)
    n = torch.get_num_threads()
    a = run_sft(str(tmp_path / "a"), cfg)
    b = run_sft(str(tmp_path / "b"), cfg)
    assert torch.get_num_threads() == n
    assert a["final_loss"] == b["final_loss"] and a["steps"] == 4
    with open(os.path.join(tmp_path / "a", "sft.json")) as f:
        info = json.load(f)
    assert [s for s, _ in info["greedy_accuracy_checks"]] == [2, 4]
