"""More advantage estimators (docs/objectives.md, "advantages"): REINFORCE++, REINFORCE++-baseline,
ReMax, OPO, GPG, pass@k (verl's ``grpo_passk`` and the analytic Pass@k-training advantage), the
optimal token baseline, GDPO and multi-turn GAE across masked spans.

Each entry is ``fn(rewards, index, num_groups, values=None, mask=None, *, <inputs>, <options>)``.
Options are keyword-only parameters WITH defaults; inputs other than rewards/values/mask are
keyword-only parameters WITHOUT defaults, and the entry declares the capability that makes
``ratiorl.advantages`` (and the trainer) supply them:

    needs_mask              mask=(B, T) completion mask (lengths, token whitening)
    needs_greedy_baseline   baseline=(B,) reward of the greedy completion of each row's prompt
    needs_reward_components components={name: (B,)} raw score of each reward function
    needs_token_stats       logp=(B, T) log pi_old of the sampled tokens, sum_pi_squared=(B, T)
                            sum over the vocabulary of pi_old^2 at each position

Conventions (verl differs, documented in docs/objectives.md): a group whose rewards are all equal,
and a group of one, gets advantage exactly 0 (verl takes mean 0 / std 1 for a group of one, so
its advantage is the reward itself).
"""

from __future__ import annotations

import math

import torch

from .advantages import ADVANTAGES, Groups, last_token_rewards


def whiten(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_whiten``: (x - mean) / sqrt(var + 1e-8) over the elements of ``m`` (0/1, or
    counts: element i taken m_i times), with the unbiased (n - 1) variance and ``m.sum() + 1e-8``
    in the means; no scaling when n < 2."""
    n = m.sum()
    mean = (x * m).sum() / (n + 1e-8)
    c = x - mean
    if float(n) < 2:
        return c
    var = (c * c * m).sum() / (n + 1e-8) * (n / (n - 1))
    return c * torch.rsqrt(var + 1e-8)


def token_whiten_rows(a: torch.Tensor, mask) -> torch.Tensor:
    """Whiten per-row constants ``a`` (B,) over the tokens of ``mask`` (each row counted
    |y_i| times, as verl does on the broadcast (B, T) tensor); over rows when ``mask`` is None.
    Returns (B,): the value every token of the row would get."""
    lengths = torch.ones_like(a) if mask is None else mask.to(a.dtype).sum(1)
    return whiten(a, lengths)


def _need_mask(name, mask):
    if mask is None:
        raise ValueError(f"advantage method {name!r} needs mask=(B, T)")
    return mask.to(torch.float32)


def discounted_returns(token_rewards: torch.Tensor, m: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over the tokens of ``m``; masked positions (tool output, padding)
    carry the running return through unchanged and get 0 (verl's REINFORCE++ recursion)."""
    out = torch.zeros_like(token_rewards)
    running = token_rewards.new_zeros(token_rewards.shape[0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        new = token_rewards[:, t] + gamma * running
        out[:, t] = new * m[:, t]
        running = new * m[:, t] + running * (1 - m[:, t])
    return out


@ADVANTAGES.register("reinforce_pp", token_level=True, needs_mask=True)
def reinforce_pp(rewards, index, G, values=None, mask=None, *, gamma: float = 1.0):
    # REINFORCE++ (Hu 2025, arXiv 2501.03262 eq. 8-9): G_t = sum_{s>=t} gamma^{s-t} r_s, then the
    # batch whitening A = (G - mean) / std over every valid token of the batch (verl reinforce_plus_plus)
    m = _need_mask("reinforce_pp", mask)
    r = last_token_rewards(rewards, m)
    return whiten(discounted_returns(r, m, gamma), m) * m


@ADVANTAGES.register("reinforce_pp_baseline", needs_groups=True, needs_mask=True)
def reinforce_pp_baseline(rewards, index, G, values=None, mask=None):
    # REINFORCE++-baseline (arXiv 2501.03262 sec. 3.2): A_i = R_i - mean_g R, then whitened over the
    # batch's tokens (each sequence counted |y_i| times; verl reinforce_plus_plus_baseline)
    g = Groups(rewards, index, G)
    return token_whiten_rows(g.zero_constant(g.centered()), mask)


@ADVANTAGES.register("remax", needs_greedy_baseline=True)
def remax(rewards, index, G, values=None, mask=None, *, baseline):
    # ReMax (Li et al. 2024, arXiv 2310.10505 Alg. 1): A_i = R(y_i) - R(greedy completion of x_i)
    b = torch.as_tensor(baseline, dtype=rewards.dtype, device=rewards.device)
    if b.shape != rewards.shape:
        raise ValueError(f"remax: baseline must have shape {tuple(rewards.shape)}, got {tuple(b.shape)}")
    return rewards - b


@ADVANTAGES.register("opo", needs_groups=True, needs_mask=True)
def opo(rewards, index, G, values=None, mask=None):
    # OPO (Hao et al. 2025, arXiv 2505.23585 eq. 5): b_g = sum_i |y_i| R_i / sum_i |y_i|, A_i = R_i - b_g
    m = _need_mask("opo", mask).to(rewards.dtype)
    L = m.sum(1)
    g = Groups(rewards, index, G)
    num = rewards.new_zeros(G).index_add(0, index, L * rewards)
    den = rewards.new_zeros(G).index_add(0, index, L)
    b = num / den.clamp_min(1.0)
    return torch.where(g.count[index] > 1, g.zero_constant(rewards - b[index]), torch.zeros_like(rewards))


@ADVANTAGES.register("gpg", needs_groups=True)
def gpg(rewards, index, G, values=None, mask=None, *, f_norm: float = 1.0):
    # GPG (Chu et al. 2025, arXiv 2504.02546 eq. 9): A_i = alpha (R_i - mean_g R) / f_norm with
    # alpha = B / #{i: R_i != 0} (the batch's non-zero rewards; verl gpg)
    g = Groups(rewards, index, G)
    alpha = rewards.shape[0] / max(int(torch.count_nonzero(rewards)), 1)
    return g.zero_constant(alpha * g.centered() / f_norm)


@ADVANTAGES.register("grpo_passk", needs_groups=True)
def grpo_passk(rewards, index, G, values=None, mask=None, *, norm_std: bool = True, eps: float = 1e-6):
    # Pass@k as verl grpo_passk (arXiv 2503.19595): only each group's best sample gets
    # (R_max - R_second) [/ (std_g + eps)]; ties go to the lowest row; groups of one get 0
    g = Groups(rewards, index, G)
    B = rewards.shape[0]
    rows = torch.arange(B, device=rewards.device)
    gmax = rewards.new_full((G,), -math.inf).scatter_reduce(0, index, rewards, "amax")
    is_max = rewards == gmax[index]
    first = torch.full((G,), B, device=rewards.device).scatter_reduce(
        0, index, torch.where(is_max, rows, torch.full_like(rows, B)), "amin")
    best = rows == first[index]
    rest = torch.where(best, torch.full_like(rewards, -math.inf), rewards)
    second = rewards.new_full((G,), -math.inf).scatter_reduce(0, index, rest, "amax")
    adv = gmax - second
    if norm_std:
        adv = adv / (g.std() + eps)
    adv = torch.where(g.count > 1, adv, torch.zeros_like(adv))
    return torch.where(best, adv[index], torch.zeros_like(rewards))


def _log_comb(n, k):
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _comb_ratio(n_top, n_bot, k):
    """C(n_top, k) / C(n_bot, k) in float64, 0 where n_top < k."""
    k = torch.as_tensor(float(k), dtype=torch.float64)
    r = torch.exp(_log_comb(n_top.clamp_min(k), k) - _log_comb(n_bot, k))
    return torch.where(n_top >= k, r, torch.zeros_like(r))


@ADVANTAGES.register("passk", needs_groups=True)
def passk(rewards, index, G, values=None, mask=None, *, k: int = 4, threshold: float = 1.0):
    # Pass@k training (Chen et al. 2025, arXiv 2508.10751 sec. 3.3, analytic form): with N samples,
    # N_neg incorrect (R < threshold), mean pass@k of a k-subset R_bar = 1 - C(N_neg,k)/C(N,k),
    # sigma = sqrt(R_bar (1 - R_bar)), A_pos = (1 - R_bar)/sigma,
    # A_neg = (1 - R_bar - C(N_neg-1,k-1)/C(N-1,k-1))/sigma; groups with sigma = 0 get 0
    correct = (rewards >= threshold).to(torch.float64)
    ones = torch.ones_like(correct)
    N = correct.new_zeros(G).index_add(0, index, ones)
    if bool((N < k).any()):
        raise ValueError(f"passk: every group needs at least k={k} samples, smallest has {int(N.min())}")
    n_neg = N - correct.new_zeros(G).index_add(0, index, correct)
    r_bar = 1.0 - _comb_ratio(n_neg, N, k)
    sigma = (r_bar * (1 - r_bar)).clamp_min(0).sqrt()
    frac = _comb_ratio(n_neg - 1, N - 1, k - 1)
    a_pos, a_neg = (1 - r_bar) / sigma, (1 - r_bar - frac) / sigma
    adv = torch.where(correct.bool(), a_pos[index], a_neg[index])
    return torch.where(sigma[index] > 0, adv, torch.zeros_like(adv)).to(rewards.dtype)


@ADVANTAGES.register("optimal_baseline", needs_groups=True, needs_mask=True, needs_token_stats=True)
def optimal_baseline(rewards, index, G, values=None, mask=None, *, logp, sum_pi_squared,
                     zero_tail: bool = True, eps: float = 1e-8):
    # Optimal token baseline (verl optimal_token_baseline): G_t = reward-to-go, per-token score norm
    # proxy w_j = 1 - 2 pi_j + sum_v pi_v^2, W_t = sum_{j<=t} w_j, B_t = sum_g G_t W_t / sum_g W_t
    # (per group and position), A_t = G_t - B_t; zero_tail: the single longest sequence of a
    # group gets B = 0 beyond the second-longest one; a group of one gets A = G
    m = _need_mask("optimal_baseline", mask).to(rewards.dtype)
    r = last_token_rewards(rewards, m)
    ret = (r * m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * logp.to(rewards.dtype).exp() + sum_pi_squared.to(rewards.dtype)
    W = (w * m).cumsum(-1) * m
    T = m.shape[1]
    num = ret.new_zeros(G, T).index_add(0, index, ret * W)
    den = ret.new_zeros(G, T).index_add(0, index, W) + eps
    base = (num / den)[index]
    count = ret.new_zeros(G).index_add(0, index, torch.ones_like(rewards))
    base = torch.where((count > 1)[index, None], base, torch.zeros_like(base))
    if zero_tail:
        L = m.sum(1)
        gmax = L.new_full((G,), -math.inf).scatter_reduce(0, index, L, "amax")
        is_max = L == gmax[index]
        n_max = L.new_zeros(G).index_add(0, index, is_max.to(L.dtype))
        second = L.new_full((G,), -math.inf).scatter_reduce(0, index, torch.where(is_max, -math.inf, L), "amax")
        unique_longest = is_max & (n_max[index] == 1) & (count[index] > 1)
        start = second[index].clamp_min(0)
        tail = torch.arange(T, device=m.device)[None, :] >= start[:, None]
        base = torch.where(unique_longest[:, None] & tail, torch.zeros_like(base), base)
    return (ret - base) * m


@ADVANTAGES.register("gdpo", needs_groups=True, needs_mask=True, needs_reward_components=True)
def gdpo(rewards, index, G, values=None, mask=None, *, components, reward_weights=None, eps: float = 1e-6,
         norm_std: bool = True):
    # GDPO (arXiv 2601.05242): each reward k normalised within the group on its own,
    # A_k = (r_k - mean_g r_k) / (std_g r_k + eps), A = sum_k w_k A_k, then whitened over the batch's
    # tokens (verl gdpo). ``reward_weights``: {name: w} (None: 1 for every component, as verl)
    if not components:
        components = {"reward": rewards}
    weights = dict(reward_weights or {})
    unknown = sorted(set(weights) - set(components))
    if unknown:
        raise ValueError(f"gdpo: reward_weights names {unknown} that are not reward components {sorted(components)}")
    total = torch.zeros_like(rewards)
    for name, score in components.items():
        g = Groups(torch.as_tensor(score, device=rewards.device).to(rewards.dtype), index, G)
        a = g.centered() / (g.std()[index] + eps) if norm_std else g.centered()
        total = total + float(weights.get(name, 1.0)) * g.zero_constant(a)
    return token_whiten_rows(total, mask)


__all__ = ["whiten", "discounted_returns", "token_whiten_rows"]
