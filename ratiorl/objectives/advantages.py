"""Advantage estimators (docs/objectives.md, "advantages"): ``advantages(rewards, group_ids,
method=..., **options)``.

Group statistics use scatter ops on ``torch.unique(group_ids, return_inverse=True)``, so group
ids may be arbitrary integers and groups need not be contiguous or equal-sized; no Python loop
over groups. Methods with a group baseline (group_mean, group_norm, batch_norm, rloo) return
exactly 0 for every member of a group whose rewards are all equal (never NaN, also for groups of
one). ``none`` has no baseline (A = R by definition) and the GAE methods depend on the critic.

Each method is ``fn(rewards, index, num_groups, values=None, mask=None, *, <options>)``
registered in ``ADVANTAGES`` with its capabilities: ``needs_groups`` (uses group ids),
``needs_critic`` (needs critic ``values``), ``token_level`` (returns (B, T) advantages from (B,)
or (B, T) rewards, ignoring groups). Its hyperparameters are its keyword-only parameters.
"""

from __future__ import annotations

import torch

from .._registry import Registry, check_keyword_options

ADVANTAGES = Registry("advantage method")


class _Groups:
    """Per-group sums/means/std of a (B,) tensor via index_add / scatter_reduce."""

    def __init__(self, x, index, G):
        self.x, self.index, self.G = x, index, G
        self.count = x.new_zeros(G).index_add(0, index, torch.ones_like(x))
        self.sum = x.new_zeros(G).index_add(0, index, x)
        self.mean = self.sum / self.count.clamp_min(1.0)
        gmax = x.new_full((G,), -float("inf")).scatter_reduce(0, index, x, "amax", include_self=True)
        gmin = x.new_full((G,), float("inf")).scatter_reduce(0, index, x, "amin", include_self=True)
        self.constant = (gmax == gmin)[index]  # (B,) member of an all-equal group (or a group of one)

    def centered(self):
        return self.x - self.mean[self.index]

    def std(self):
        """Sample standard deviation (n - 1 in the denominator, TRL/torch.std semantics), 0 for n = 1."""
        c = self.centered()
        ss = self.x.new_zeros(self.G).index_add(0, self.index, c * c)
        return (ss / (self.count - 1.0).clamp_min(1.0)).sqrt()

    def zero_constant(self, a):
        return torch.where(self.constant, torch.zeros_like(a), a)


@ADVANTAGES.register("none")
def none(rewards, index, G, values=None, mask=None):
    # REINFORCE without baseline: A_i = R_i (SNIB "- baseline" ablation)
    return rewards.clone()


@ADVANTAGES.register("group_mean", needs_groups=True)
def group_mean(rewards, index, G, values=None, mask=None):
    # A_i = R_i - mean_g R (SNIB Alg. 1 line 4; Dr.GRPO, tutorial sec. 7.1)
    g = _Groups(rewards, index, G)
    return g.zero_constant(g.centered())


@ADVANTAGES.register("group_norm", needs_groups=True)
def group_norm(rewards, index, G, values=None, mask=None, *, eps: float = 1e-4):
    # GRPO (tutorial sec. 6.1): A_i = (R_i - mean_g R) / (std_g R + eps), sample std, eps = 1e-4 (TRL)
    g = _Groups(rewards, index, G)
    return g.zero_constant(g.centered() / (g.std()[index] + eps))


@ADVANTAGES.register("batch_norm", needs_groups=True)
def batch_norm(rewards, index, G, values=None, mask=None, *, eps: float = 1e-4):
    # TRL scale_rewards="batch": A_i = (R_i - mean_g R) / (std_batch R + eps)
    g = _Groups(rewards, index, G)
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return g.zero_constant(g.centered() / (std + eps))


@ADVANTAGES.register("rloo", needs_groups=True)
def rloo(rewards, index, G, values=None, mask=None):
    # RLOO: A_i = R_i - mean_{j in g, j != i} R_j = n/(n-1) (R_i - mean_g R); 0 for a group of one
    g = _Groups(rewards, index, G)
    n = g.count[index]
    loo = (g.sum[index] - rewards) / (n - 1.0).clamp_min(1.0)
    return g.zero_constant(torch.where(n > 1, rewards - loo, torch.zeros_like(rewards)))


def _gae(rewards, values, mask, gamma, lam):
    """GAE (tutorial sec. 4.2): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.

    ``rewards`` (B,) is placed on each sequence's last valid token (outcome reward), or (B, T) per
    token. The state after the last valid token is terminal (V = 0). ``lam`` is a float or (B,).
    Returns (B, T) advantages, 0 on padding; the critic's returns are ``advantages + values``.
    """
    if values is None or mask is None:
        raise ValueError("method 'gae' needs values=(B, T) critic values and mask=(B, T)")
    m = mask.to(torch.float32)
    V = values.detach().to(torch.float32) * m
    B, T = V.shape
    if rewards.dim() == 1:
        lengths = m.sum(1).long()
        r = torch.zeros_like(V)
        rows = torch.arange(B, device=V.device)
        r[rows, (lengths - 1).clamp_min(0)] = rewards.to(torch.float32) * (lengths > 0)
    else:
        r = rewards.to(torch.float32) * m
    next_valid = torch.cat([m[:, 1:], m.new_zeros(B, 1)], dim=1)
    next_V = torch.cat([V[:, 1:], V.new_zeros(B, 1)], dim=1) * next_valid
    delta = r + gamma * next_V - V
    coef = (gamma * torch.as_tensor(lam, dtype=torch.float32, device=V.device)).expand(B)
    adv = torch.zeros_like(V)
    running = V.new_zeros(B)
    for t in range(T - 1, -1, -1):  # recursion over time: inherently sequential, vectorised over B
        running = delta[:, t] + coef * next_valid[:, t] * running
        adv[:, t] = running
    return adv * m


@ADVANTAGES.register("gae", needs_critic=True, token_level=True)
def gae(rewards, index, G, values=None, mask=None, *, gamma: float = 1.0, lam: float = 0.95):
    # PPO with a critic: token-level GAE (tutorial sec. 4.2)
    return _gae(rewards, values, mask, gamma, lam)


@ADVANTAGES.register("gae_length_adaptive", needs_critic=True, token_level=True)
def gae_length_adaptive(rewards, index, G, values=None, mask=None, *, gamma: float = 1.0, alpha: float = 0.05):
    # VAPO (tutorial sec. 7.3): lam_i = 1 - 1 / (alpha * len_i), clamped to [0, 1] (short responses)
    if mask is None:
        raise ValueError("method 'gae_length_adaptive' needs values=(B, T) and mask=(B, T)")
    lengths = mask.to(torch.float32).sum(1).clamp_min(1.0)
    lam = (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)
    return _gae(rewards, values, mask, gamma, lam)


def advantages(rewards, group_ids=None, method: str = "group_norm", values=None, mask=None,
               **options) -> torch.Tensor:
    """Advantages from rewards.

    Args:
        rewards: (B,) outcome rewards (or (B, T) token rewards for the GAE methods).
        group_ids: (B,) ints, which prompt each sequence answers; ``None`` = one group (the batch).
        method: one of ``ADVANTAGES`` (none, group_mean, group_norm, batch_norm, rloo, gae,
            gae_length_adaptive).
        values, mask: (B, T) critic values and completion mask (methods with ``needs_critic``).
        **options: the method's own options (unknown ones raise ``ValueError``): ``eps`` (1e-4)
            for the normalised methods; ``gamma`` (1.0), ``lam`` (0.95) for ``gae``;
            ``gamma``, ``alpha`` (0.05) for ``gae_length_adaptive``.

    Returns:
        (B,) float32 advantages (float64 if rewards are float64), or (B, T) for the GAE methods.
    """
    fn = ADVANTAGES.lookup(method)
    check_keyword_options("advantage method", method, fn, options)
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    if rewards.dtype not in (torch.float32, torch.float64):
        rewards = rewards.to(torch.float32)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards contains NaN/inf ({int((~torch.isfinite(rewards)).sum())} entries); clean the reward function output")
    if values is not None and not bool(torch.isfinite(values).all()):
        raise ValueError("values contains NaN/inf")
    B = rewards.shape[0]
    if getattr(fn, "token_level", False):  # per-token methods ignore groups
        index, G = None, 1
    else:
        if rewards.dim() != 1:
            raise ValueError(f"rewards must have shape (B,) for method {method!r}, got {tuple(rewards.shape)}")
        if group_ids is None:
            index, G = torch.zeros(B, dtype=torch.long, device=rewards.device), 1
        else:
            group_ids = torch.as_tensor(group_ids, device=rewards.device)
            if group_ids.shape != (B,):
                raise ValueError(f"group_ids must have shape (B,) = ({B},), got {tuple(group_ids.shape)}")
            uniq, index = torch.unique(group_ids, return_inverse=True)
            G = int(uniq.numel())
    return fn(rewards, index, G, values, mask, **options)


__all__ = ["ADVANTAGES", "advantages"]
