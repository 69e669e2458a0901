"""Forward passes through the transformer body of a causal LM (no output head).

``completion_hidden(...)`` returns the final hidden states that predict completion tokens: the
state at position p of ``cat(prompt, completion)`` predicts token p + 1. When the G completions
of a prompt sit in consecutive rows it runs the prompt once per group and shares its KV cache.

``masked_completion_hidden(...)`` returns only the states of real completion tokens and skips the
padding: rows are sorted by completion length and run in a few *length buckets*, each trimmed to
its longest completion (``length_buckets`` chooses them with a cost model), then the states are
put back in row order. With shared prompts the prompt pass still runs once for all distinct
prompts; each bucket gathers the KV cache rows of its own rows.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from .compat import cache_kwarg, output_cache

# Fixed cost of one more bucket (one more call through the transformer body, forward and backward)
# in token positions, for models of hidden size 256. A narrow model's token is cheap, so a call's
# fixed cost is worth more tokens there: ``bucket_overhead_tokens`` scales it by (256 / H)^2 below
# H = 256; on CPU a wide model's token is dear and a call is not, so it scales it by (256 / H)^4
# above (51 at H = 384, 10 at H = 576). Measured on CPU (body forward + backward, fixed cost / cost
# per token): ~144 tokens at H = 64, ~55 at H = 128, < 1 at H = 384 (1 thread); the defaults are
# 4096, 1024 and 51, on purpose conservative: the small benchmark (H = 128, 128 rows of <= 8
# tokens: a split saves < 896) and the examples (H = 64, 256 rows of <= 5 tokens) always keep one
# bucket. At H = 384 (2 threads, 6 layers, the realistic benchmark's batches of 64 rows x <= 64
# tokens, at most 4 buckets) a price of 256 / 64 / 16 tokens left 7-11% / 4% / 4% padding and the
# training pass took 1.60 / 1.58 / 1.55 s (median of 12).
BUCKET_OVERHEAD_TOKENS = 256


# At most this many candidate bucket edges (distinct lengths) in the split search: its cost is
# k x MAX_SPLIT_POINTS^2; beyond it the edges are taken at quantiles of the distinct lengths.
MAX_SPLIT_POINTS = 256


class Bucket(NamedTuple):
    """Rows that run together and their common width (``rows`` None: one bucket, every row and
    every completion column as given, exactly the unbucketed forward)."""

    rows: torch.Tensor | None
    width: int


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: cumsum(mask) - 1, clamped at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(hf_model: nn.Module) -> nn.Module:
    """The transformer body (embeddings ... final norm) of a *ForCausalLM model."""
    body = getattr(hf_model, getattr(hf_model, "base_model_prefix", ""), None)
    if body is None and hasattr(hf_model, "get_decoder"):
        body = hf_model.get_decoder()
    if body is None or body is hf_model:
        raise ValueError(f"cannot find the transformer body of {type(hf_model).__name__}")
    return body


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Runs of identical consecutive prompt rows (the G completions of one prompt).

    Returns ``(first, inverse)``: the row of each distinct prompt, and for every row the index of
    its distinct prompt; None when sharing would save less than half of the prompt rows.
    """
    B = prompt_ids.shape[0]
    if B < 2:
        return None
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    if 2 * int(starts.sum()) > B:
        return None
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


# ----------------------------------------------------------------------------- length buckets


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the width each row needs: last masked position + 1 (0 for a row without tokens)."""
    T = completion_mask.shape[1]
    pos = torch.arange(1, T + 1, device=completion_mask.device)
    return (completion_mask.bool() * pos).amax(1)


def bucket_overhead_tokens(hf_model) -> float:
    """The default per-bucket overhead for ``hf_model``: 256 token positions, times (256 / H)^2 for
    a hidden size H < 256, and on CPU times (256 / H)^4 for H > 256 (256 when the config names no
    hidden size)."""
    cfg = hf_model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    H = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not H:
        return float(BUCKET_OVERHEAD_TOKENS)
    if H > 256:
        param = next(hf_model.parameters(), None)
        on_cpu = param is None or param.device.type == "cpu"
        return BUCKET_OVERHEAD_TOKENS * (256 / H) ** 4 if on_cpu else float(BUCKET_OVERHEAD_TOKENS)
    return BUCKET_OVERHEAD_TOKENS * (256 / H) ** 2


def length_buckets(lengths: torch.Tensor, max_buckets: int, overhead: float = BUCKET_OVERHEAD_TOKENS) -> list:
    """Split rows into at most ``max_buckets`` buckets of similar completion length.

    Cost model: a bucket of n rows trimmed to its longest completion L costs n * L token
    positions plus ``overhead`` (a fixed per-call cost in token-equivalents). Rows are sorted by
    length and the contiguous split of least total cost is found by dynamic programming over
    the distinct lengths u_1 < ... < u_m with C_j rows of length <= u_j:

        f_k(j) = min_{i < j} f_{k-1}(i) + (C_j - C_i) u_j + overhead,   f_0(0) = 0

    A split is taken only when it costs strictly less than one bucket. Rows without completion
    tokens need no computation and join no bucket (unless everything fits one bucket, which then
    keeps every row in its original order). Returns a list of :class:`Bucket`.
    """
    lengths = lengths.detach().to("cpu", torch.long)
    L = int(lengths.max()) if lengths.numel() else 0
    one = [Bucket(None, max(L, 1))]
    if max_buckets <= 1 or lengths.numel() < 2:
        return one
    values, counts = torch.unique(lengths[lengths > 0], sorted=True, return_counts=True)
    if values.numel() < 2:
        return one
    cum = counts.cumsum(0)
    if values.numel() > MAX_SPLIT_POINTS:  # long completions: bucket edges at length quantiles only
        keep = torch.linspace(0, values.numel() - 1, MAX_SPLIT_POINTS).round().long().unique()
        values, cum = values[keep], cum[keep]
    m = values.numel()
    u = torch.cat([torch.zeros(1), values.double()])  # u[j], j = 1..m
    C = torch.cat([torch.zeros(1), cum.double()])  # rows with length <= u[j]
    idx = torch.arange(m + 1)
    allowed = idx[:, None] < idx[None, :]  # i < j
    cost = (C[None, :] - C[:, None]) * u[None, :] + overhead  # of the bucket of lengths (u_i, u_j]
    cost = cost.masked_fill(~allowed, float("inf"))
    f = torch.full((m + 1,), float("inf"), dtype=torch.float64)
    f[0] = 0.0
    best_cost, best_k, parents = None, 0, []
    for k in range(1, min(max_buckets, m) + 1):
        f, arg = (f[:, None] + cost).min(0)
        parents.append(arg)
        if best_cost is None or float(f[m]) < best_cost:
            best_cost, best_k = float(f[m]), k
    if best_k == 1:
        return one
    cuts, j = [], m  # walk the split back: bucket k covers distinct lengths (parent, j]
    for k in range(best_k, 0, -1):
        i = int(parents[k - 1][j])
        cuts.append((i, j))
        j = i
    order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[order]
    buckets = []
    for i, j in reversed(cuts):
        lo, hi = (0 if i == 0 else int(values[i - 1])), int(values[j - 1])
        rows = order[(sorted_len > lo) & (sorted_len <= hi)]
        buckets.append(Bucket(rows, hi))
    return buckets


# ----------------------------------------------------------------------------- the body


def hidden_states(hf_model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = backbone(hf_model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def full_completion_hidden(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """(B, Tc, H) from one forward over ``cat(prompt, completion)[:, :-1]``."""
    # The last completion token predicts nothing we need, so drop it from the input:
    # hidden state at position Tp-1+j predicts completion token j (j = 0..Tc-1).
    input_ids = torch.cat([prompt_ids, completion_ids], 1)[:, :-1]
    attn = torch.cat([prompt_mask, completion_mask], 1)[:, :-1]
    return hidden_states(hf_model, input_ids, attn, position_ids_from_mask(attn))[:, prompt_ids.shape[1] - 1 :]


class SharedPrompt(NamedTuple):
    """One prompt pass over the distinct prompts: the last prompt state (predicts completion token
    0) and the KV cache of each distinct prompt, plus each row's distinct prompt."""

    last: torch.Tensor  # (D, H)
    cache: object  # a DynamicCache with D rows
    inverse: torch.Tensor  # (B,) row -> distinct prompt


def shared_prompt_pass(hf_model, prompt_ids, prompt_mask, groups) -> SharedPrompt | None:
    """Run the body once over each distinct prompt (``groups`` from :func:`prompt_groups`).

    Returns None (the caller falls back to full forwards) when the model does not return a plain
    ``DynamicCache``, checkpoints activations now (which turns the cache off) or has active dropout
    (each row must draw its own dropout masks over the prompt).
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return None
    if hf_model.training and torch.is_grad_enabled():
        ckpt = getattr(hf_model, "is_activation_checkpointing", None)  # transformers >= 5 (PEFT forwards it)
        if ckpt is None:
            ckpt = getattr(hf_model, "is_gradient_checkpointing", False)
        if ckpt:
            return None
    if hf_model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in hf_model.modules()):
        return None
    first, inverse = groups
    body = backbone(hf_model)
    up, um = prompt_ids.index_select(0, first), prompt_mask.index_select(0, first)
    out = body(input_ids=up, attention_mask=um, position_ids=position_ids_from_mask(um), use_cache=True)
    cache = output_cache(out)
    if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    return SharedPrompt(out.last_hidden_state[:, -1], cache, inverse)


def select_cache_rows(cache, rows: torch.Tensor):
    """A new cache holding rows ``rows`` of ``cache`` (``index_select``: keeps the autograd graph;
    ``cache`` itself is left as it is, so several buckets can gather from it)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.reorder_cache(rows)
    return out


def completions_after_prompt(hf_model, shared: SharedPrompt, rows, prompt_mask, completion_ids, completion_mask):
    """(n, Tc, H) for rows ``rows`` (None = all) of the batch; ``prompt_mask``, ``completion_ids``
    and ``completion_mask`` are those rows' already. The completion tokens attend to the gathered
    prompt cache; the prompt's gradient is the sum over its rows, as in the full forward."""
    idx = shared.inverse if rows is None else shared.inverse.index_select(0, rows)
    h_first = shared.last.index_select(0, idx)  # predicts completion token 0
    if completion_ids.shape[1] == 1:
        return h_first[:, None]
    cache = select_cache_rows(shared.cache, idx)  # (distinct prompts, ...) -> (n, ...)
    body = backbone(hf_model)
    Tp = prompt_mask.shape[1]
    attn = torch.cat([prompt_mask, completion_mask[:, :-1]], 1)
    pos = position_ids_from_mask(attn)[:, Tp:]
    rest = body(input_ids=completion_ids[:, :-1], attention_mask=attn, position_ids=pos,
                use_cache=True, **{cache_kwarg(body): cache})
    rest = rest.last_hidden_state if hasattr(rest, "last_hidden_state") else rest[0]
    return torch.cat([h_first[:, None], rest], 1)


def completion_hidden_shared(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups):
    """``hidden_states(cat(prompt, completion)[:, :-1])[:, Tp-1:]`` with one prompt pass per group,
    or None when the prompt cache cannot be shared (see :func:`shared_prompt_pass`)."""
    shared = shared_prompt_pass(hf_model, prompt_ids, prompt_mask, groups)
    if shared is None:
        return None
    return completions_after_prompt(hf_model, shared, None, prompt_mask, completion_ids, completion_mask)


def completion_hidden(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups=None):
    """(B, Tc, H): the final hidden states that predict completion tokens 0..Tc-1.

    Prompts are left-padded, completions right-padded, masks long 0/1 with padded ids already
    valid. ``groups`` (from :func:`prompt_groups`) shares one prompt pass per group when the
    model allows it; otherwise one forward over ``cat(prompt, completion)[:, :-1]``.
    """
    if groups is not None:
        h = completion_hidden_shared(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups)
        if h is not None:
            return h
    return full_completion_hidden(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask)


def masked_completion_hidden(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups=None,
                             buckets=None) -> torch.Tensor:
    """(N, H): the states that predict the N real completion tokens, in row-major order
    (``completion_hidden(...)[completion_mask.bool()]``), computed bucket by bucket.

    ``buckets`` from :func:`length_buckets` (None = one bucket of every row, the plain
    :func:`completion_hidden`). Each bucket runs only its rows and its first ``width`` completion
    columns (and, without shared prompts, drops prompt columns that are padding in all of its
    rows); no padding past a bucket's longest completion is computed. Values equal those of the
    one-bucket forward up to float rounding.
    """
    sel = completion_mask.bool()
    if buckets is None or (len(buckets) == 1 and buckets[0].rows is None):
        # the unbucketed forward, columns as given: a sharded (FSDP) model needs the same body
        # calls on every rank, and the shared-prompt pass makes one call for one column, two else
        return completion_hidden(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups)[sel]
    shared = shared_prompt_pass(hf_model, prompt_ids, prompt_mask, groups) if groups is not None else None
    # where each real token goes in the (N, H) output: its rank among the masked positions
    dest_of = (sel.flatten().long().cumsum(0) - 1).view(sel.shape)
    states, dest = [], []
    for rows, width in buckets:
        rows = rows.to(prompt_ids.device)  # length_buckets works on the CPU
        pm = prompt_mask.index_select(0, rows)
        ci = completion_ids.index_select(0, rows)[:, :width]
        cm = completion_mask.index_select(0, rows)[:, :width]
        if shared is not None:
            h = completions_after_prompt(hf_model, shared, rows, pm, ci, cm)
        else:
            pi = prompt_ids.index_select(0, rows)
            has = pm.any(0).nonzero()
            p0 = int(has[0]) if len(has) else pm.shape[1] - 1  # prompt columns that are padding in every row
            h = full_completion_hidden(hf_model, pi[:, p0:], pm[:, p0:], ci, cm)
        m = cm.bool()
        states.append(h[m])
        dest.append(dest_of.index_select(0, rows)[:, :width][m])
    states, dest = torch.cat(states), torch.cat(dest)
    return states.index_select(0, torch.argsort(dest))  # dest is a permutation of 0..N-1
