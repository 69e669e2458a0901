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
or (B, T) rewards, ignoring groups), ``needs_mask``, ``needs_greedy_baseline``,
``needs_reward_components``, ``needs_token_stats`` (see ``advantages_extra``: the trainer supplies
those inputs). Its hyperparameters are its keyword-only parameters with defaults; its inputs
beyond rewards/values/mask are keyword-only parameters without defaults.
"""

from __future__ import annotations

import torch

from .._registry import Registry, check_keyword_options

ADVANTAGES = Registry("advantage method")


class Groups:
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
def group_mean(rewards, index, G, values=None, mask=None, *, singleton: str = "zero"):
    # A_i = R_i - mean_g R (SNIB Alg. 1 line 4; Dr.GRPO, tutorial sec. 7.1)
    g = Groups(rewards, index, G)
    return _singletons(g, g.zero_constant(g.centered()), rewards, 1.0, singleton)


@ADVANTAGES.register("group_norm", needs_groups=True)
def group_norm(rewards, index, G, values=None, mask=None, *, eps: float = 1e-4, singleton: str = "zero"):
    # GRPO (tutorial sec. 6.1): A_i = (R_i - mean_g R) / (std_g R + eps), sample std, eps = 1e-4 (TRL)
    g = Groups(rewards, index, G)
    return _singletons(g, g.zero_constant(g.centered() / (g.std()[index] + eps)), rewards, 1.0 + eps, singleton)


def _singletons(g, adv, rewards, scale, singleton):
    """A group of one has no baseline. ``singleton="zero"`` (ours, TRL's): its advantage is 0.
    ``"reward"`` (verl's compute_grpo_outcome_advantage): mean 0 and std 1 for that group, so
    A = R / scale (R, or R / (1 + eps) when normalised)."""
    if singleton == "zero":
        return adv
    if singleton != "reward":
        raise ValueError(f"singleton must be 'zero' or 'reward', got {singleton!r}")
    alone = g.count[g.index] == 1
    return torch.where(alone, rewards / scale, adv)


@ADVANTAGES.register("batch_norm", needs_groups=True)
def batch_norm(rewards, index, G, values=None, mask=None, *, eps: float = 1e-4):
    # TRL scale_rewards="batch": A_i = (R_i - mean_g R) / (std_batch R + eps)
    g = Groups(rewards, index, G)
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return g.zero_constant(g.centered() / (std + eps))


@ADVANTAGES.register("rloo", needs_groups=True)
def rloo(rewards, index, G, values=None, mask=None):
    # RLOO: A_i = R_i - mean_{j in g, j != i} R_j = n/(n-1) (R_i - mean_g R); 0 for a group of one
    g = Groups(rewards, index, G)
    n = g.count[index]
    loo = (g.sum[index] - rewards) / (n - 1.0).clamp_min(1.0)
    return g.zero_constant(torch.where(n > 1, rewards - loo, torch.zeros_like(rewards)))


def last_index(m: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last position with ``m`` = 1 (0 for an empty row)."""
    T = m.shape[1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    return torch.where(m > 0, pos, torch.zeros_like(pos)).amax(1)


def last_token_rewards(rewards: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, T) token rewards: (B,) outcome rewards on each row's last valid token of ``m`` (nothing
    on an empty row), or (B, T) rewards masked by ``m``."""
    m = m.to(rewards.dtype)
    if rewards.dim() == 2:
        return rewards * m
    r = torch.zeros_like(m)
    rows = torch.arange(m.shape[0], device=m.device)
    r[rows, last_index(m)] = rewards * (m.sum(1) > 0)
    return r


def gae_recursion(rewards, values, mask, gamma, lam, skip_masked: bool = False):
    """GAE (tutorial sec. 4.2): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.

    ``rewards`` (B,) is placed on each sequence's last valid token (outcome reward), or (B, T) per
    token. The state after the last valid token is terminal (V = 0). ``lam`` is a float or (B,).
    ``skip_masked``: positions with mask 0 inside a sequence (tool output of a multi-turn
    trajectory) are skipped: V_{t+1} and A_{t+1} are those of the next valid token, so values and
    advantages carry across the gap (verl ``compute_gae_advantage_return`` with a multi-turn
    response mask). Returns (B, T) advantages, 0 on masked positions; returns = advantages + values.
    """
    if values is None or mask is None:
        raise ValueError("method 'gae' needs values=(B, T) critic values and mask=(B, T)")
    m = mask.to(torch.float32)
    V = values.detach().to(torch.float32) * m
    B, T = V.shape
    r = last_token_rewards(rewards.to(torch.float32), m)
    coef = (gamma * torch.as_tensor(lam, dtype=torch.float32, device=V.device)).expand(B)
    adv = torch.zeros_like(V)
    running = V.new_zeros(B)
    if skip_masked:
        next_V = V.new_zeros(B)
        for t in range(T - 1, -1, -1):  # masked positions keep (next_V, running) unchanged
            new = r[:, t] + gamma * next_V - V[:, t] + coef * running
            next_V = torch.where(m[:, t] > 0, V[:, t], next_V)
            running = torch.where(m[:, t] > 0, new, running)
            adv[:, t] = running
        return adv * m
    next_valid = torch.cat([m[:, 1:], m.new_zeros(B, 1)], dim=1)
    next_V = torch.cat([V[:, 1:], V.new_zeros(B, 1)], dim=1) * next_valid
    delta = r + gamma * next_V - V
    for t in range(T - 1, -1, -1):  # recursion over time: inherently sequential, vectorised over B
        running = delta[:, t] + coef * next_valid[:, t] * running
        adv[:, t] = running
    return adv * m


@ADVANTAGES.register("gae", needs_critic=True, token_level=True)
def gae(rewards, index, G, values=None, mask=None, *, gamma: float = 1.0, lam: float = 0.95,
        critic_lam=None, skip_masked: bool = False):
    # PPO with a critic: token-level GAE (tutorial sec. 4.2); critic_lam: lambda of the critic's
    # returns (None = lam); skip_masked: multi-turn, carry values across masked tool spans
    return gae_recursion(rewards, values, mask, gamma, lam, skip_masked)


@ADVANTAGES.register("gae_length_adaptive", needs_critic=True, token_level=True)
def gae_length_adaptive(rewards, index, G, values=None, mask=None, *, gamma: float = 1.0, alpha: float = 0.05,
                        critic_lam=None, skip_masked: bool = False):
    # VAPO (tutorial sec. 7.3, VAPO eq. 7): lam_i = 1 - 1 / (alpha * len_i), clamped to [0, 1];
    # the critic's returns use critic_lam (VAPO: 1.0, Monte Carlo; None = the policy's lam_i)
    if mask is None:
        raise ValueError("method 'gae_length_adaptive' needs values=(B, T) and mask=(B, T)")
    lengths = mask.to(torch.float32).sum(1).clamp_min(1.0)
    lam = (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)
    return gae_recursion(rewards, values, mask, gamma, lam, skip_masked)


# declared capability -> the inputs ``advantages()`` hands to the entry (keyword-only, no default)
INPUTS = {"needs_greedy_baseline": ("baseline",), "needs_reward_components": ("components",),
          "needs_token_stats": ("logp", "sum_pi_squared")}


def advantages(rewards, group_ids=None, method: str = "group_norm", values=None, mask=None, *,
               baseline=None, components=None, logp=None, sum_pi_squared=None, **options) -> torch.Tensor:
    """Advantages from rewards.

    Args:
        rewards: (B,) outcome rewards (or (B, T) token rewards for the token-level methods).
        group_ids: (B,) ints, which prompt each sequence answers; ``None`` = one group (the batch).
        method: one of ``ADVANTAGES`` (``ratiorl objectives`` and docs/objectives.md list them).
        values, mask: (B, T) critic values and completion mask (methods with ``needs_critic`` /
            ``needs_mask``; others ignore them).
        baseline: (B,) reward of the greedy completion of each row's prompt (``needs_greedy_baseline``: remax).
        components: {name: (B,)} raw score of each reward function (``needs_reward_components``: gdpo).
        logp, sum_pi_squared: (B, T) log pi_old of the sampled tokens and sum_v pi_old(v)^2 per
            position (``needs_token_stats``: optimal_baseline).
        **options: the method's own options (unknown ones raise ``ValueError``), e.g. ``eps``
            (1e-4) for the normalised methods; ``gamma`` (1.0), ``lam`` (0.95) for ``gae``.

    Returns:
        (B,) float32 advantages (float64 if rewards are float64), or (B, T) for the token-level methods.
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
    given = {"baseline": baseline, "components": components, "logp": logp, "sum_pi_squared": sum_pi_squared}
    inputs = {}
    for cap, names in INPUTS.items():
        if getattr(fn, cap, False):
            for n in names:
                if given[n] is None and n != "components":
                    raise ValueError(f"advantage method {method!r} declares {cap}: pass {n}=")
                inputs[n] = given[n]
    if getattr(fn, "needs_mask", False) and mask is None:
        raise ValueError(f"advantage method {method!r} needs mask=(B, T)")
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
    return fn(rewards, index, G, values, mask, **inputs, **options)


__all__ = ["ADVANTAGES", "Groups", "advantages", "gae_recursion", "last_index", "last_token_rewards"]

from . import advantages_extra  # noqa: E402,F401  (registers the entries of advantages_extra)
