"""Stop strings: a completion ends at the first occurrence of any of them in its decoded text; the
stop text is kept, later tokens are dropped and masked, the kept tokens' log-probs are unchanged."""

import random

import pytest
import torch

from ratiorl.policy import Policy
from ratiorl.rollout import HFRolloutEngine
from ratiorl.rollout.stops import StopStrings

PROMPTS = ["12+34=", "7+5=", "a much longer prompt: 99+1=", "x"]


def engine_for(path):
    policy = Policy.from_pretrained(path, reference="none")
    return HFRolloutEngine(policy.model, policy.tokenizer)


def first_stop(tok, ids, stops):
    """Index of the first token whose full decoded prefix contains a stop string (None: never)."""
    for t in range(len(ids)):
        text = tok.decode(ids[: t + 1], skip_special_tokens=True)
        if any(s in text for s in stops):
            return t
    return None


def common_substrings(texts, n):
    counts = {}
    for text in texts:
        for i in range(len(text) - n + 1):
            counts[text[i: i + n]] = counts.get(text[i: i + n], 0) + 1
    return sorted(counts, key=lambda s: (-counts[s], s))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_stop_strings_cut_completions_like_post_eos_tokens(eos_model_dir, temperature):
    eng = engine_for(eos_model_dir)
    tok = eng.tokenizer
    G = 6 if temperature else 1
    gen = lambda **kw: eng.generate(PROMPTS * 2, G, max_new_tokens=16, temperature=temperature,
                                    generator=torch.Generator().manual_seed(5), **kw)
    free = gen()
    stops = [common_substrings(free.completion_texts, 2)[0], common_substrings(free.completion_texts, 3)[1]]
    cut = gen(stop=stops)
    eos = tok.eos_token_id
    n_stopped = 0
    for i in range(len(free)):
        n_free = int(free.completion_mask[i].sum())
        ids = free.completion_ids[i, :n_free].tolist()
        body = ids[:-1] if ids[-1] == eos else ids
        t = first_stop(tok, body, stops)
        n = n_free if t is None else t + 1
        assert int(cut.completion_mask[i].sum()) == n and cut.completion_mask[i, :n].all()
        # the same draws up to the stop: same tokens, same recorded log-probs
        assert cut.completion_ids[i, :n].tolist() == ids[:n]
        torch.testing.assert_close(cut.behaviour_logp[i, :n], free.behaviour_logp[i, :n], rtol=0, atol=1e-5)
        assert (cut.behaviour_logp[i, n:] == 0).all() and (cut.completion_ids[i, n:] == tok.pad_token_id).all()
        if t is None:
            assert cut.completion_texts[i] == free.completion_texts[i]
            assert bool(cut.truncated[i]) == bool(free.truncated[i])
        else:
            n_stopped += n < n_free
            text = tok.decode(body[: t + 1], skip_special_tokens=True)
            end = min(text.find(s) + len(s) for s in stops if s in text)
            assert cut.completion_texts[i] == text[:end]
            assert any(cut.completion_texts[i].endswith(s) for s in stops)
            assert not bool(cut.truncated[i])  # a stop string is a proper end, not a cut by the length limit
    assert 0 < n_stopped < len(free)  # not vacuous: some completions stopped early, some did not


def bpe_tokenizer(kind):
    """A small trained BPE tokenizer: byte-level (GPT-2, Llama 3 style) or Metaspace (SentencePiece style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The answer is 42.\n\nDone. café → naïve 😀 ###", "Step 1: add 3 and 4.\n\n#### 7",
              "</answer> <answer>12</answer> ab ab ab"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<eos>", "<unk>"])
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_the_window_finds_the_first_stop_of_the_full_text(kind):
    """Token by token, ``StopStrings.completed`` fires first at the token whose full decoded
    prefix first contains a stop string (multi-byte characters split over tokens included)."""
    tok = bpe_tokenizer(kind)
    stops = ["\n\n", "→ 😀", "##", "</answer>", "é n", " ab"]
    pieces = ["ab", " ab", "\n", "→", " 😀", "#", "</answer>", "é", " naïve", "42", " ", "x"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    rows = [tok(t)["input_ids"] for t in texts]
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), tok.eos_token_id)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    ss = StopStrings(stops, tok)
    found = [None] * len(rows)
    for t in range(T):
        live = torch.tensor([i for i in range(len(rows)) if found[i] is None and t < len(rows[i])], dtype=torch.long)
        for i, hit in zip(live.tolist(), ss.completed(tokens, live, t).tolist()):
            if hit:
                found[i] = t
    want = [first_stop(tok, r, stops) for r in rows]
    assert found == want
    assert sum(w is not None for w in want) > 50 and sum(w is None for w in want) > 5
    multi = [r for r in rows if any(len(tok.decode([x])) == 0 or "\ufffd" in tok.decode([x]) for x in r)]
    assert kind == "metaspace" or multi  # byte-level: some characters are split over tokens


def test_cut():
    ss = StopStrings(["\n\n", "###", "b"], tokenizer=None)
    assert ss.cut("abc\n\nd") == "ab"  # "b" ends first
    assert ss.cut("x\n\ny###") == "x\n\n"
    assert ss.cut("none here") == "none here"
    assert not StopStrings([], None) and ss
