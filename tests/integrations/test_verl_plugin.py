"""The verl plugin: ratiorl objectives through verl's own get_policy_loss_fn / agg_loss (CPU, float64)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

import ratiorl  # noqa: E402
from ratiorl.integrations import verl as plugin  # noqa: E402

get_policy_loss_fn, agg_loss = core_algos.get_policy_loss_fn, core_algos.agg_loss
N_GEN = 4  # rollout.n


def actor_config(**kw):
    kw.setdefault("ppo_micro_batch_size_per_gpu", 8)
    return verl_config.ActorConfig(strategy="fsdp", rollout_n=N_GEN, ppo_mini_batch_size=4, **kw)


def batch(B=8, T=7, seed=0, spread=0.15):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread).clamp(max=-1e-3)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, adv[:, None].expand(B, T).clone() * mask, mask


def plugin_loss(name, config, mode, rollout_is_weights=None, data=None):
    logp, old, adv, mask = data if data is not None else batch()
    lp = logp.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                                             loss_agg_mode=mode, config=config,
                                             rollout_is_weights=rollout_is_weights)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def direct_loss(obj, data=None, **kw):
    logp, old, adv, mask = data if data is not None else batch()
    lp = logp.clone().requires_grad_()
    out = obj(lp, old, adv, mask.double(), **kw)
    out.loss.backward()
    return out.loss.detach(), lp.grad


def test_entry_point_registers_losses_on_import_verl(tmp_path):
    # a fresh interpreter outside the repository (a stale ratiorl.egg-info in the repo root would
    # shadow the installed metadata): `import verl` alone must register ratiorl's losses
    code = ("import sys\nfrom importlib.metadata import entry_points\n"
            "if not any(e.value == 'ratiorl.integrations.verl' for e in entry_points(group='verl.plugins')):\n"
            "    print('NO-ENTRY-POINT'); sys.exit(0)\n"
            "import verl\nfrom verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "assert 'ratiorl.integrations.verl' in sys.modules\n"
            "print(type(get_policy_loss_fn('ratiorl.snib')).__name__)")
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "NO-ENTRY-POINT":
        pytest.skip("ratiorl installed without its verl.plugins entry point (reinstall: pip install -e .)")
    assert out.stdout.strip() == "VerlPolicyLoss"


def test_every_preset_is_registered():
    for preset in ratiorl.available_objectives():
        if not ratiorl.objective(preset).needs_behaviour_logp:
            assert isinstance(get_policy_loss_fn("ratiorl." + preset), plugin.VerlPolicyLoss)


@pytest.mark.parametrize("preset,mode,direct", [
    ("dapo", "token-mean", dict(aggregation="token_mean", clip_low=0.2, clip_high=0.28)),
    ("grpo", "seq-mean-token-mean", dict(aggregation="seq_mean_token_mean", clip_low=0.2, clip_high=0.28)),
    ("gspo", "seq-mean-token-mean", dict(aggregation="seq_mean_token_mean", clip_low=0.2, clip_high=0.28)),
    ("snib", "seq-mean-token-mean", dict(aggregation="seq_mean_token_mean", clip_low=0.2, clip_high=0.28)),
    ("snib", "token-mean", dict(aggregation="token_mean", clip_low=0.2, clip_high=0.28)),
])
@pytest.mark.parametrize("dp", [1, 2])
def test_loss_and_gradient_equal_ratiorl_direct(preset, mode, direct, dp):
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    data = batch()
    logp, old, adv, mask = data
    kw = {}
    if dp > 1:  # what verl's ppo_loss puts in global_batch_info on each of dp ranks
        gbi = dict(dp_size=dp, batch_num_tokens=int(mask.sum()) * dp + 5, global_batch_size=logp.shape[0] * dp)
        cfg.global_batch_info.update(gbi)
        kw = dict(num_tokens=gbi["batch_num_tokens"] / dp, num_sequences=gbi["global_batch_size"] / dp)
    elif mode.startswith("seq-mean"):
        kw = dict(num_sequences=float((mask.sum(1) > 0).sum()))
    obj = ratiorl.objective(preset, beta=0.0, **direct)
    if obj.loss_needs_groups:  # rows 0..3 answer prompt 0, rows 4..7 prompt 1 (rollout.n = 4)
        kw["group_ids"] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    loss, grad, metrics = plugin_loss("ratiorl." + preset, cfg, mode, data=data)
    ref_loss, ref_grad = direct_loss(obj, data=data, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grad.abs().sum() > 0
    assert set(metrics) >= {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}


def test_snib_depends_on_the_group_layout():
    # an independent check that the plugin really groups rows by rollout.n: with rollout.n = 2 the
    # self-normaliser runs over pairs and the loss changes
    data = batch()
    l4 = plugin_loss("ratiorl.snib", actor_config(), "token-mean", data=data)[0]
    l2 = plugin_loss("ratiorl.snib", verl_config.ActorConfig(strategy="fsdp", rollout_n=2, ppo_mini_batch_size=4,
                                                             ppo_micro_batch_size_per_gpu=8), "token-mean", data=data)[0]
    obj = ratiorl.objective("snib", beta=0.0, aggregation="token_mean")
    ref2 = direct_loss(obj, data=data, group_ids=torch.arange(8) // 2)[0]
    torch.testing.assert_close(l2, ref2, rtol=1e-12, atol=1e-12)
    assert abs(float(l4 - l2)) > 1e-6


# ---------------------------------------------------------------- against verl's own losses and agg_loss
@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dp", [1, 2])
def test_aggregations_equal_verl_agg_loss(mode, dp):
    # reinforce: per-token loss -r*A, so verl's agg_loss of that matrix is an independent reference
    cfg = actor_config(loss_scale_factor=11 if mode == "seq-mean-token-sum-norm" and dp == 2 else None)
    logp, old, adv, mask = data = batch(seed=3)
    gbi = {}
    if dp > 1:
        gbi = dict(dp_size=dp, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=17)
        cfg.global_batch_info.update(gbi)
    loss, grad, _ = plugin_loss("ratiorl.reinforce", cfg, mode, data=data)
    lp = logp.clone().requires_grad_()
    ref = agg_loss(-torch.exp(lp - old) * adv, mask, mode, loss_scale_factor=cfg.loss_scale_factor, **gbi)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, lp.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("with_is", [False, True])
def test_ppo_equals_verl_vanilla(mode, with_is):
    cfg = actor_config(clip_ratio_low=0.1, clip_ratio_high=0.15, clip_ratio_c=1.3)
    data = batch(seed=5, spread=0.4)  # ratios far enough from 1 that both clips and the dual clip act
    w = torch.rand(data[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 if with_is else None
    loss, grad, metrics = plugin_loss("ratiorl.ppo", cfg, mode, rollout_is_weights=w, data=data)
    ref, ref_grad, ref_metrics = plugin_loss("vanilla", cfg, mode, rollout_is_weights=w, data=data)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert metrics["actor/ppo_kl"] == pytest.approx(ref_metrics["actor/ppo_kl"])
    if not with_is:
        assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["actor/pg_clipfrac"])
        assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["actor/ratiorl/dual_clip_frac"] > 0


def test_gspo_token_equals_verl_gspo():
    cfg = actor_config(clip_ratio_low=0.003, clip_ratio_high=0.004)
    data = batch(seed=7, spread=0.01)
    for mode in ("token-mean", "seq-mean-token-mean"):
        loss, grad, _ = plugin_loss("ratiorl.gspo_token", cfg, mode, data=data)
        ref, ref_grad, _ = plugin_loss("gspo", cfg, mode, data=data)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- rollout correction and preconditions
def test_sequence_rollout_weights_multiply_the_snib_loss():
    logp, old, adv, mask = data = batch(seed=9)
    w_seq = torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    w = w_seq[:, None].expand_as(logp).clone()
    loss, grad, _ = plugin_loss("ratiorl.snib", actor_config(), "token-mean", rollout_is_weights=w, data=data)
    obj = ratiorl.objective("snib", beta=0.0, aggregation="token_mean")
    # reference: the per-sequence SNIB loss times the weight, from the objective's own details
    lp = logp.clone().requires_grad_()
    g = torch.arange(8) // N_GEN
    det = obj(lp, old, adv, mask.double(), group_ids=g, return_details=True).details
    x, A = det.weight, adv[:, 0]
    lo, hi = 1 - obj.clip_low, 1 + obj.clip_high
    L = -torch.minimum(x * A, x.clamp(lo, hi) * A)  # PPO clip on the sequence weight (SNIB Alg. 1 line 10)
    assert torch.allclose(loss, (w_seq * L * mask.sum(1)).sum() / mask.sum())
    with pytest.raises(ValueError, match="rollout_is=sequence"):
        plugin_loss("ratiorl.snib", actor_config(), "token-mean",
                    rollout_is_weights=torch.rand(logp.shape, dtype=torch.float64), data=data)


@pytest.mark.parametrize("change,match", [
    (dict(shuffle=True), "shuffle"),
    (dict(use_dynamic_bsz=True), "use_dynamic_bsz"),
])
def test_group_precondition_errors(change, match):
    with pytest.raises(ValueError, match=match):
        plugin_loss("ratiorl.snib", actor_config(**change), "token-mean")
    plugin_loss("ratiorl.dapo", actor_config(**change), "token-mean")  # no groups needed: fine


def test_partial_group_is_an_error():
    logp, old, adv, mask = batch(B=6)
    with pytest.raises(ValueError, match="not a multiple of rollout.n=4"):
        plugin_loss("ratiorl.snib", actor_config(), "token-mean", data=(logp, old, adv, mask))


def test_mismatch_objective_cannot_be_registered_and_custom_objective_can():
    with pytest.raises(ValueError, match="rollout_correction"):
        plugin.register("ratiorl.test_mm", ratiorl.objective("grpo", mismatch_level="token"))
    obj = ratiorl.objective("ctpo", pos_power=0.7)
    plugin.register("ratiorl.test_ctpo07", obj, overwrite=True)
    data = batch(seed=11)
    loss, grad, _ = plugin_loss("ratiorl.test_ctpo07", actor_config(), "token-mean", data=data)
    ref, ref_grad = direct_loss(obj.replace(beta=0.0), data=data)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already has a policy loss"):
        plugin.register("vanilla", obj)
