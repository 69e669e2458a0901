"""A tiny model whose tokenizer has a chat template (the char tokenizer plus a Jinja template)."""

from __future__ import annotations

from ratiorl.policy import make_tiny_model

# ASCII only, so the character-level tokenizer reads every rendered prompt
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


def save_chat_model(path, **sizes):
    sizes = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 128, "seed": 0, **sizes}
    model, tok = make_tiny_model(**sizes)
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
