"""Run TRL's own GRPO loss code on tensors chosen by a test.

`TRLLoss` builds real `trl.GRPOTrainer` instances around a tiny randomly initialised GPT-2
(character-level tokenizer built locally, no hub access) and evaluates
`GRPOTrainer.compute_loss` on caller-supplied per-token log-probs. The only thing replaced is
the trainer's model forward (`_get_per_token_logps_and_entropies`, patched on the instance for
the duration of one call) so that it returns the caller's leaf tensor: everything downstream of
it (ratios, clipping, SAPO gate, CISPO weights, KL and its bias correction, aggregation and
normalisers) is TRL's code, unmodified.

A trainer is built per distinct `GRPOConfig` (about 30 ms each on CPU) and cached, so every
hyperparameter goes through TRL's own constructor and config post-processing rather than being
patched onto a live trainer.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import torch

_VOCAB_CHARS = "abcdefghij0123456789 +="


class TRLLoss:
    """Factory of GRPOTrainers on a tiny local model, plus a loss evaluator."""

    def __init__(self, workdir: str | Path | None = None):
        from datasets import Dataset
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ratiorl_trl_")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.model_dir = self.workdir / "tiny-gpt2"

        vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
        for ch in _VOCAB_CHARS:
            vocab[ch] = len(vocab)
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        )
        self.tokenizer.padding_side = "left"
        self.tokenizer.save_pretrained(self.model_dir)
        config = GPT2Config(
            vocab_size=len(vocab),
            n_positions=64,
            n_embd=8,
            n_layer=1,
            n_head=2,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(self.model_dir)
        self.vocab_size = len(vocab)
        self.dataset = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+6=", "7+8="]})
        self._trainers: dict[tuple, object] = {}

    @staticmethod
    def _zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    def trainer(self, **grpo_config):
        """A GRPOTrainer for `GRPOConfig(**grpo_config)` (plus fixed CPU/no-logging settings)."""
        key = tuple(sorted(grpo_config.items()))
        if key not in self._trainers:
            from transformers import GPT2LMHeadModel
            from trl import GRPOConfig, GRPOTrainer

            base = dict(
                output_dir=str(self.workdir / "out"),
                report_to="none",
                use_cpu=True,
                bf16=False,
                per_device_train_batch_size=4,
                gradient_accumulation_steps=1,
                num_generations=2,
                max_completion_length=16,
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
            )
            base.update(grpo_config)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                args = GRPOConfig(**base)
                # A fresh model per trainer: GRPOTrainer patches the model it is given.
                model = GPT2LMHeadModel.from_pretrained(self.model_dir)
                trainer = GRPOTrainer(
                    model=model,
                    reward_funcs=self._zero_reward,
                    args=args,
                    train_dataset=self.dataset,
                    processing_class=self.tokenizer,
                )
            self._trainers[key] = trainer
        return self._trainers[key]

    @contextlib.contextmanager
    def _patched_forward(self, trainer, logp: torch.Tensor, calls: list, entropies=None):
        entropies = torch.zeros_like(logp).detach() if entropies is None else entropies

        def fake_forward(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
            calls.append((tuple(input_ids.shape), int(logits_to_keep)))
            return logp, entropies, None

        trainer._get_per_token_logps_and_entropies = fake_forward
        try:
            yield
        finally:
            del trainer._get_per_token_logps_and_entropies

    def loss(
        self,
        trainer,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        ref_logp: torch.Tensor | None = None,
        num_items_in_batch: int | float | None = None,
        prompt_len: int = 4,
        seed: int = 0,
        entropies: torch.Tensor | None = None,
        extra_inputs: dict | None = None,
    ) -> torch.Tensor:
        """TRL's `compute_loss` on these tensors, as one training micro-step (no accumulation).

        `logp` must be a leaf (or any tensor with grad) of shape (B, T); `mask` (B, T) 0/1.
        `num_items_in_batch` is the token count TRL's `dapo`/`cispo` normalise by (defaults to
        `mask.sum()`, as `_generate_and_score_completions` computes it on one process).
        """
        B, T = logp.shape
        gen = torch.Generator().manual_seed(seed)
        completion_mask = mask.to(torch.long)  # TRL builds it as an integer tensor
        inputs = {
            "prompt_ids": torch.randint(3, self.vocab_size, (B, prompt_len), generator=gen),
            "prompt_mask": torch.ones(B, prompt_len, dtype=torch.long),
            "completion_ids": torch.randint(3, self.vocab_size, (B, T), generator=gen)
            * completion_mask,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "old_per_token_logps": old_logp,
            "num_items_in_batch": torch.as_tensor(
                completion_mask.sum() if num_items_in_batch is None else num_items_in_batch
            ),
        }
        if ref_logp is not None:
            inputs["ref_per_token_logps"] = ref_logp
        inputs.update(extra_inputs or {})  # e.g. sampling_per_token_logps for TRL's off-policy mask
        # One optimizer step made of a single micro-batch, on a single process.
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        assert trainer.accelerator.num_processes == 1
        calls: list = []
        with self._patched_forward(trainer, logp, calls, entropies):
            loss = trainer.compute_loss(trainer.model, inputs)
        # TRL asked our stand-in forward for exactly the completion log-probs, once.
        assert calls == [((B, prompt_len + T), T)], calls
        return loss

    def close(self):
        self._trainers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
