"""Prompts as the model sees them: the tokenizer's chat template, applied in one place.

A dataset gives a prompt as plain text (``"12+34="``) or as a list of chat messages
(``[{"role": "user", "content": "..."}]``). ``render_prompt`` turns either into the string the
sampler tokenizes:

- ``chat_template="auto"`` (the default): the template is applied when the tokenizer has one
  (an instruct model), and plain text is used as it is otherwise (the tiny model);
- ``"true"``: always apply it (an error when the tokenizer has none);
- ``"false"``: never; a list of messages is then joined as ``"role: content"`` lines.

``system_prompt`` (when not empty) is added as a first ``system`` message unless the messages
already start with one. Training (``render_task``, called once when the trainer has its
tokenizer), evaluation and the supervised warm start all go through ``render_prompt``, so the
model sees the same prompt text everywhere. When rendering changes a prompt, the dataset's own
prompt is kept in the example's ``question`` field (as text) for rewards that want it.
"""

from __future__ import annotations

import dataclasses

CHAT_TEMPLATE_MODES = ("auto", "true", "false")


def chat_mode(value) -> str:
    """``True``/``False``/``"auto"``/``"yes"``/... -> ``"auto" | "true" | "false"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    v = str(value).strip().lower()
    v = {"yes": "true", "on": "true", "1": "true", "no": "false", "off": "false", "0": "false",
         "none": "false"}.get(v, v)
    if v not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"task.chat_template must be auto, true or false, got {value!r}")
    return v


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_messages(prompt) -> list:
    """A prompt as a list of ``{"role", "content"}`` messages (plain text -> one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in prompt) and prompt:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise ValueError(f"a prompt must be a string or a non-empty list of {{role, content}} messages, got {prompt!r}")


def prompt_text(prompt) -> str:
    """The prompt as plain text: a string as it is, messages joined as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in as_messages(prompt))


def render_prompt(prompt, tokenizer, chat_template="auto", system_prompt: str | None = None) -> str:
    """The string the model is given for ``prompt`` (text or messages); see the module docstring."""
    mode = chat_mode(chat_template)
    use_template = mode == "true" or (mode == "auto" and has_chat_template(tokenizer))
    if mode == "true" and not has_chat_template(tokenizer):
        raise ValueError("task.chat_template=true but the tokenizer has no chat template "
                         "(use auto or false, or a tokenizer with a template)")
    if not use_template:
        text = prompt_text(prompt)
        return f"{system_prompt}\n{text}" if system_prompt else text
    messages = as_messages(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_examples(examples: list, tokenizer, chat_template="auto", system_prompt: str | None = None) -> list:
    """New example dicts with ``prompt`` rendered (and the dataset's prompt kept as ``question``
    when rendering changed it)."""
    cache: dict = {}
    out = []
    for ex in examples:
        raw = ex["prompt"]
        key = raw if isinstance(raw, str) else repr(raw)
        if key not in cache:
            cache[key] = render_prompt(raw, tokenizer, chat_template, system_prompt)
        row = {**ex, "prompt": cache[key]}
        if cache[key] != raw and "question" not in ex:
            row["question"] = prompt_text(raw)
        out.append(row)
    return out


def render_task(task, tokenizer, task_cfg):
    """A copy of ``task`` whose train and eval prompts are rendered with ``task_cfg.chat_template``
    and ``task_cfg.system_prompt`` (a config's ``task:`` section)."""
    mode = getattr(task_cfg, "chat_template", "auto")
    system = getattr(task_cfg, "system_prompt", None) or None
    return dataclasses.replace(task, train=render_examples(task.train, tokenizer, mode, system),
                               eval=render_examples(task.eval, tokenizer, mode, system))


__all__ = [
    "CHAT_TEMPLATE_MODES",
    "as_messages",
    "chat_mode",
    "has_chat_template",
    "prompt_text",
    "render_examples",
    "render_prompt",
    "render_task",
]
