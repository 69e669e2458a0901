"""Chat templates: one render function used by training, evaluation and SFT."""

import pytest

from ratiorl.policy import make_char_tokenizer
from ratiorl.train.prompts import render_examples, render_prompt
from ratiorl.train.sft import make_sft_batch

from .chat_helpers import CHAT_TEMPLATE, save_chat_model


def chat_tok():
    tok = make_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_render_modes():
    tok, plain = chat_tok(), make_char_tokenizer()
    assert render_prompt("1+2=", tok) == "u:1+2=\na:"  # auto: the template is there
    assert render_prompt("1+2=", plain) == "1+2="  # auto: no template, text as it is
    assert render_prompt("1+2=", tok, "false") == "1+2="
    assert render_prompt("1+2=", tok, True, system_prompt="Add.") == "s:Add.\nu:1+2=\na:"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_prompt(msgs, tok, system_prompt="ignored") == "s:S\nu:Q\na:"  # has its own system message
    assert render_prompt(msgs, plain) == "system: S\nuser: Q"
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("x", plain, "true")
    with pytest.raises(ValueError, match="auto, true or false"):
        render_prompt("x", tok, "maybe")


def test_render_examples_keeps_the_question():
    rows = render_examples([{"prompt": "1+2=", "answer": "3"}], chat_tok())
    assert rows == [{"prompt": "u:1+2=\na:", "answer": "3", "question": "1+2="}]
    assert render_examples([{"prompt": "1+2=", "answer": "3"}], make_char_tokenizer()) == [
        {"prompt": "1+2=", "answer": "3"}]


def test_trainer_eval_and_sft_see_the_rendered_prompt(tmp_path, make_config):
    from ratiorl.train import Trainer
    from ratiorl.train.sft import SFTConfig, run_sft

    save_chat_model(tmp_path / "chat")
    cfg = make_config(**{"model.path": str(tmp_path / "chat"), "task.system_prompt": "Add."})
    trainer = Trainer(cfg)
    try:
        batch = trainer.sample(2)
        for p, q in zip(batch.fields["prompt"], batch.fields["question"]):
            assert p == f"s:Add.\nu:{q}\na:"
        # the prompt ids the sampler used are exactly the rendered text
        ids = batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist()
        assert trainer.tokenizer.decode(ids) == batch.fields["prompt"][0]
        assert all(ex["prompt"].startswith("s:Add.\nu:") for ex in trainer.task.eval)  # evaluation too
    finally:
        trainer.close()
    off = make_config(**{"model.path": str(tmp_path / "chat"), "task.chat_template": "false",
                         "out_dir": str(tmp_path / "off")})
    t2 = Trainer(off)
    try:
        assert "question" not in t2.task.train[0] and t2.task.train[0]["prompt"].endswith("=")
    finally:
        t2.close()
    # SFT: the tiny model has no template (auto -> plain); the batch is built from the rendered prompt
    tok = chat_tok()
    ids, mask, lab = make_sft_batch(tok, render_examples([{"prompt": "1+2=", "answer": "3"}], tok))
    n_prompt = len("u:1+2=\na:")
    assert tok.decode(ids[0, :n_prompt]) == "u:1+2=\na:" and (lab[0, :n_prompt] == -100).all()
    res = run_sft(str(tmp_path / "sft"), SFTConfig(steps=1, batch_size=4, task_options={"n_train": 8, "n_eval": 2},
                                                   model_sizes={"n_layer": 1, "n_head": 2, "n_embd": 16}))
    assert res["steps"] == 1
