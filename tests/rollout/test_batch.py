"""Rollout: select / select_groups / split_by_groups / concat / trim / to keep every field aligned."""

import dataclasses

import pytest
import torch

from ratiorl.rollout import Rollout

PAD = 9


def make(prompt_lens, completion_lens, group_ids, seed=0, with_token_adv=False):
    """A batch whose every per-row value encodes its row, so misalignment is visible."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    Tp, Tc = max(prompt_lens), max(completion_lens)
    prompt_ids = torch.full((B, Tp), PAD)
    prompt_mask = torch.zeros(B, Tp, dtype=torch.long)
    completion_ids = torch.full((B, Tc), PAD)
    completion_mask = torch.zeros(B, Tc, dtype=torch.long)
    for i, (lp, lc) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, Tp - lp:] = 100 * i + torch.arange(lp)
        prompt_mask[i, Tp - lp:] = 1
        completion_ids[i, :lc] = 100 * i + 50 + torch.arange(lc)
        completion_mask[i, :lc] = 1
    logp = -torch.rand(B, Tc, generator=g) * completion_mask
    adv = torch.randn(B, Tc, generator=g) * completion_mask if with_token_adv else torch.randn(B, generator=g)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, behaviour_logp=logp, old_logp=logp.clone(),
        group_ids=torch.tensor(group_ids), truncated=torch.tensor([c == Tc for c in completion_lens]),
        completion_texts=[f"text{i}" for i in range(B)], pad_token_id=PAD,
        rewards=torch.arange(B, dtype=torch.float32), reward_components={"f": torch.arange(B, dtype=torch.float32) * 2},
        advantages=adv, fields={"answer": [str(i) for i in range(B)]}, counters={"time/rollout": 1.5},
    )


def row_of(batch, i):
    """Row i with padding stripped: the real tokens and per-row values."""
    pm, cm = batch.prompt_mask[i].bool(), batch.completion_mask[i].bool()
    adv = batch.advantages[i][cm].tolist() if batch.advantages.dim() == 2 else float(batch.advantages[i])
    return (batch.prompt_ids[i][pm].tolist(), batch.completion_ids[i][cm].tolist(),
            batch.old_logp[i][cm].tolist(), float(batch.rewards[i]), float(batch.reward_components["f"][i]),
            batch.completion_texts[i], batch.fields["answer"][i], adv, bool(batch.truncated[i]))


def test_select_keeps_rows_aligned():
    b = make([2, 3, 1, 3], [2, 4, 1, 3], [0, 0, 1, 1])
    s = b.select([3, 0])
    assert len(s) == 2
    assert row_of(s, 0) == row_of(b, 3) and row_of(s, 1) == row_of(b, 0)
    assert s.group_ids.tolist() == [1, 0] and s.counters == b.counters and s.pad_token_id == PAD


def test_select_groups_renumbers_and_split_keeps_whole_groups():
    b = make([1] * 6, [1, 2, 3, 1, 2, 3], [5, 5, 7, 7, 2, 2])
    assert b.groups() == [5, 7, 2]
    s = b.select_groups([2, 5])
    assert s.group_ids.tolist() == [0, 0, 1, 1]
    assert [row_of(s, i) for i in range(4)] == [row_of(b, i) for i in (4, 5, 0, 1)]
    parts = b.split_by_groups(2)
    assert [p.group_ids.tolist() for p in parts] == [[5, 5, 7, 7], [2, 2]]  # whole groups, ids kept
    assert sum(len(p) for p in parts) == len(b)
    with pytest.raises(ValueError, match="not in this batch"):
        b.select_groups([3])


@pytest.mark.parametrize("token_adv", [False, True])
def test_concat_repads_and_keeps_groups_distinct(token_adv):
    a = make([2, 2], [1, 2], [0, 0], seed=1, with_token_adv=token_adv)
    b = make([4, 1, 3], [5, 3, 1], [0, 1, 1], seed=2, with_token_adv=token_adv)
    c = Rollout.concat([a, b])
    assert c.prompt_ids.shape == (5, 4) and c.completion_ids.shape == (5, 5)
    assert [row_of(c, i) for i in range(5)] == [row_of(a, 0), row_of(a, 1), row_of(b, 0), row_of(b, 1), row_of(b, 2)]
    # prompts stay left-padded (real tokens at the end), completions right-padded, pad id and 0 masks
    assert c.prompt_mask[0].tolist() == [0, 0, 1, 1] and c.prompt_ids[0, 0] == PAD
    assert c.completion_mask[0].tolist() == [1, 0, 0, 0, 0] and c.completion_ids[0, 1] == PAD
    assert float(c.old_logp[0, 1:].abs().sum()) == 0.0
    assert c.group_ids.tolist() == [0, 0, 1, 2, 2]  # the second part's groups are shifted
    assert c.counters == {"time/rollout": 3.0}  # extensive counters add up
    assert c.completion_texts == a.completion_texts + b.completion_texts


def test_concat_refuses_parts_that_do_not_match():
    a = make([1], [1], [0])
    b = dataclasses.replace(make([1], [1], [0]), ref_logp=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="ref_logp"):
        Rollout.concat([a, b])
    with pytest.raises(ValueError, match="advantages is per token in some parts"):
        Rollout.concat([a, make([1], [1], [0], with_token_adv=True)])


def test_trim_drops_all_padding_columns_only():
    b = make([1, 2], [2, 3], [0, 0], with_token_adv=True)
    wide = Rollout.concat([b, make([5], [6], [0], with_token_adv=True)]).select([0, 1])  # padded wider than needed
    assert wide.prompt_ids.shape[1] == 5 and wide.completion_ids.shape[1] == 6
    t = wide.trim()
    assert t.prompt_ids.shape[1] == 2 and t.completion_ids.shape[1] == 3
    assert t.advantages.shape == (2, 3) and t.old_logp.shape == (2, 3)
    assert [row_of(t, i) for i in range(2)] == [row_of(b, i) for i in range(2)]


def test_to_moves_every_tensor():
    b = make([1, 2], [2, 1], [0, 0]).to("meta")  # a device without a GPU: every tensor must move
    tensors = [getattr(b, f.name) for f in dataclasses.fields(b) if isinstance(getattr(b, f.name), torch.Tensor)]
    assert len(tensors) >= 8 and all(t.device.type == "meta" for t in tensors)
    assert b.reward_components["f"].device.type == "meta"
    assert b.completion_texts == ["text0", "text1"]
