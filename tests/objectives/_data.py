"""Random inputs for the objective tests (fresh per call unless a seed is given)."""

from __future__ import annotations

import torch


def make_batch(B=6, T=7, *, seed=None, dtype=torch.float64, scale=0.3, lengths=None, groups=None,
               token_adv=False, with_empty=True):
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    logp = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        if with_empty and B > 2:
            lengths[2] = 0
        lengths[0] = T
    lengths = torch.as_tensor(lengths)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if token_adv:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(B, generator=g, dtype=torch.float64)
        adv[1] = 0.0 if B > 3 else adv[1]
    if groups is None:
        groups = torch.arange(B) // 3
    token_kl = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.2
    # padding carries garbage that must never matter
    logp = torch.where(mask, logp, torch.full_like(logp, -3.0))
    return dict(logp=logp.to(dtype), old=old.to(dtype), adv=adv.to(dtype), mask=mask, group_ids=torch.as_tensor(groups),
                ref=ref.to(dtype), token_kl=token_kl.to(dtype))


def call(obj, d, logp=None, token_kl=None, **kw):
    logp = d["logp"] if logp is None else logp
    return obj(logp, d["old"], d["adv"], d["mask"], group_ids=d["group_ids"], ref_logp=d["ref"],
               token_kl=d["token_kl"] if token_kl is None else token_kl, **kw)


def loss_and_grad(obj, d, **kw):
    logp = d["logp"].detach().clone().requires_grad_(True)
    kl = d["token_kl"].detach().clone().requires_grad_(True)
    out = call(obj, d, logp=logp, token_kl=kl, **kw)
    gl, gk = torch.autograd.grad(out.loss, (logp, kl), allow_unused=True)
    return out, gl, (torch.zeros_like(kl) if gk is None else gk)
