"""A learned reward: a sequence-classification model given by path, scored in batches.

    rewards:
      - {name: reward_model, weight: 1.0, options: {path: my-rm, batch_size: 16}}

The model (``AutoModelForSequenceClassification``) and its tokenizer are loaded once, when the
reward is built. Each completion is scored with the text ``prompt + completion`` (``template:
concat``), or, with ``template: chat``, as a user/assistant exchange through the reward model's
chat template (the prompt is then the dataset's question when the trainer rendered it). The
score is the logit of ``label`` (a one-output model: its only output), or with ``output:
probability`` the softmax probability of ``label`` (sigmoid for a one-output model).
"""

from __future__ import annotations

import torch

from .base import register_reward


def load_reward_model(path: str, device: str = "cpu", dtype: str | None = None):
    """``(model, tokenizer)`` for a sequence-classification checkpoint, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kw = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"reward_model: could not load {path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


@register_reward("reward_model")
def reward_model(*, path: str = "", batch_size: int = 16, max_length: int = 1024, label: int = 0,
                 output: str = "logit", template: str = "concat", device: str = "cpu",
                 dtype: str | None = None):
    """See the module docstring."""
    if not path:
        raise ValueError("reward_model: give options.path (a sequence-classification model folder or hub name)")
    if output not in ("logit", "probability"):
        raise ValueError(f"reward_model: output must be logit or probability, got {output!r}")
    if template not in ("concat", "chat"):
        raise ValueError(f"reward_model: template must be concat or chat, got {template!r}")
    if batch_size < 1:
        raise ValueError(f"reward_model: batch_size must be >= 1, got {batch_size}")
    model, tok = load_reward_model(path, device, dtype)
    truncation_side = "left"  # keep the completion when a long prompt must be cut

    def text(prompt: str, completion: str) -> str:
        if template == "chat":
            return tok.apply_chat_template([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": completion}], tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def reward_model(completions, *, prompts=None, answers=None, **fields):
        questions = fields.get("question") if template == "chat" else None
        source = questions if questions is not None else prompts
        texts = [text("" if source is None else str(source[i]), str(c)) for i, c in enumerate(completions)]
        out: list[float] = []
        old = tok.truncation_side, tok.padding_side
        # right padding: positions start at 0 in every row (a classifier does not shift them)
        tok.truncation_side, tok.padding_side = truncation_side, "right"
        try:
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length, add_special_tokens=template == "concat")
                logits = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float()
                if logits.shape[-1] == 1:
                    s = logits[:, 0].sigmoid() if output == "probability" else logits[:, 0]
                else:
                    s = logits.softmax(-1)[:, label] if output == "probability" else logits[:, label]
                out.extend(s.cpu().tolist())
        finally:
            tok.truncation_side, tok.padding_side = old
        return out

    return reward_model


__all__ = ["load_reward_model", "reward_model"]
