"""Equivalences between objectives (docs/objectives.md, "equivalences"): on-policy gradient =
REINFORCE; weighted/hard = clip (DGPO eq. 2); GSPO-token = GSPO (GSPO sec. 4.3); cumulative =
token at t = 1 and sequence at t = |y| (CTPO Prop. 1); split batches (TRL equivalence lives in
test_trl_equivalence.py)."""

import pytest
import torch

import ratiorl
from ratiorl.objectives import WEIGHTS, Objective
from ratiorl.objectives._batch import BatchInfo

from ._data import loss_and_grad, make_batch

TOKEN_PRESETS = [n for n in ratiorl.available_objectives() if ratiorl.objective(n).level == "token"]
AGGS = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum", "sequence"]


@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("name", TOKEN_PRESETS)
def test_1_on_policy_gradient_is_reinforce(name, token_adv):
    obj = ratiorl.objective(name, beta=0.0)
    if not getattr(obj.entry("token_selection"), "identity", False):
        pytest.skip("a token selection drops or penalises tokens by design (test_verl_trl_losses.py)")
    if token_adv and getattr(obj.entry("shaping"), "sequence_advantage", False):
        pytest.skip("the shaping averages token advantages per sequence (GMPO)")
    d = make_batch(token_adv=token_adv)
    d["old"] = d["logp"].clone()  # on-policy: logp == old_logp in value
    _, g, _ = loss_and_grad(obj, d)
    reinforce = Objective(weight="token", shaping="none", aggregation=obj.aggregation,
                          aggregation_options=obj.aggregation_options)
    _, g_ref, _ = loss_and_grad(reinforce, d)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)
    assert g.abs().sum() > 0


def test_1_reinforce_gradient_by_hand():
    d = make_batch(token_adv=False)
    d["old"] = d["logp"].clone()
    _, g, _ = loss_and_grad(Objective(weight="token", shaping="none", aggregation="token_mean"), d)
    n = d["mask"].sum()
    torch.testing.assert_close(g, -d["adv"][:, None] * d["mask"] / n)


@pytest.mark.parametrize("weight", ["token", "cumulative", "sequence", "geometric_token", "self_normalized"])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (None, 0.28), (0.1, None)])
def test_3_weighted_hard_equals_clip(weight, clip):
    lo, hi = clip
    d = make_batch(scale=0.4, token_adv=(weight in ("token", "cumulative")))
    agg = "sequence" if weight in ("sequence", "self_normalized") else "token_mean"
    a = Objective(weight=weight, shaping="clip", shaping_options=dict(clip_low=lo, clip_high=hi), aggregation=agg)
    b = a.replace(shaping="weighted", rule="hard")
    out_a, ga, _ = loss_and_grad(a, d)
    out_b, gb, _ = loss_and_grad(b, d)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)
    assert out_a.metrics["clip_frac"] == out_b.metrics["clip_frac"]


@pytest.mark.parametrize("shaping", ["clip", "none", "gate", "dual_clip"])
def test_4_geometric_token_equals_geometric(shaping):
    d = make_batch(scale=0.05)  # A is one value per sequence
    bounds = dict(clip_low=3e-2, clip_high=4e-2) if shaping in ("clip", "dual_clip") else {}
    geo = Objective(weight="geometric", shaping=shaping, shaping_options=bounds, aggregation="sequence")
    tok = geo.replace(weight="geometric_token", aggregation="seq_mean_token_mean")
    out_g, gg, _ = loss_and_grad(geo, d)
    out_t, gt, _ = loss_and_grad(tok, d)
    torch.testing.assert_close(gg, gt, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(out_g.loss, out_t.loss, rtol=1e-10, atol=1e-13)
    assert gg.abs().sum() > 0


def _weight(name, delta, mask):
    info = BatchInfo(mask.to(delta.dtype), torch.arange(delta.shape[0]) // 3, None, None, 0)
    return WEIGHTS[name](delta * mask, info)


def test_5_cumulative_is_token_first_and_sequence_last():
    d = make_batch(with_empty=False)
    mask = d["mask"].double()
    delta = (d["logp"] - d["old"]) * mask
    cum = _weight("cumulative", delta, mask).log_w
    tok = _weight("token", delta, mask).log_w
    seq = _weight("sequence", delta, mask).log_w
    torch.testing.assert_close(cum[:, 0], tok[:, 0])
    last = mask.sum(1).long() - 1
    rows = torch.arange(mask.shape[0])
    torch.testing.assert_close(cum[rows, last], seq, rtol=1e-12, atol=1e-12)
    # and strictly in between elsewhere: the prefix product is neither
    assert not torch.allclose(cum[:, 1:], tok[:, 1:])


def test_5_cumulative_gradients_at_first_and_last_token():
    d = make_batch(scale=0.2, with_empty=False)
    kw = dict(shaping="none", aggregation="token_mean")
    _, g_cum, _ = loss_and_grad(Objective(weight="cumulative", **kw), d)
    _, g_tok, _ = loss_and_grad(Objective(weight="token", **kw), d)
    _, g_seq, _ = loss_and_grad(Objective(weight="sequence_token", **kw), d)
    torch.testing.assert_close(g_cum[:, 0], g_tok[:, 0])
    last = d["mask"].sum(1).long() - 1
    rows = torch.arange(len(last))
    torch.testing.assert_close(g_cum[rows, last], g_seq[rows, last])


def _split_grad(obj, d, parts):
    """Sum of the parts' losses with global counts -> gradient on the whole logp."""
    logp = d["logp"].detach().clone().requires_grad_(True)
    kl = d["token_kl"].detach().clone().requires_grad_(True)
    n_tok = int(d["mask"].sum())
    B = d["mask"].shape[0]
    total = 0.0
    for rows in parts:
        out = obj(logp[rows], d["old"][rows], d["adv"][rows], d["mask"][rows], group_ids=d["group_ids"][rows],
                  ref_logp=d["ref"][rows], token_kl=kl[rows], num_tokens=n_tok, num_sequences=B)
        total = total + out.loss
    return total, torch.autograd.grad(total, (logp, kl), allow_unused=True)


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "snib", "ctpo", "dgpo"])
def test_6_split_batch_reproduces_full_gradient(name, aggregation):
    obj = ratiorl.objective(name, aggregation=aggregation, beta=0.05)
    d = make_batch(B=9, T=6, groups=torch.arange(9) // 3)
    full, g_full, gk_full = loss_and_grad(obj, d)
    parts = [torch.arange(0, 3), torch.arange(3, 9)] if torch.rand(()) < 0.5 else [torch.arange(i, i + 3) for i in (0, 3, 6)]
    total, (g_split, gk_split) = _split_grad(obj, d, parts)
    torch.testing.assert_close(total, full.loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_split, g_full, rtol=1e-10, atol=1e-13)
    if gk_split is not None:
        torch.testing.assert_close(gk_split, gk_full, rtol=1e-10, atol=1e-13)
