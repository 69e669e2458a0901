"""Aggregation: how per-token or per-sequence losses become one scalar (docs/objectives.md).

``fn(L, info, *, <options>) -> scalar`` registered in ``AGGREGATIONS`` with ``level``
(and ``uses_generation_limit=True`` when its ``max_tokens`` option is the generation limit):
"token" functions receive L of shape (B, T) (any value on padding: they mask it),
"sequence" functions receive L of shape (B,) (0 for empty/dropped responses).
The core converts between levels: a per-sequence loss is broadcast to the sequence's tokens for a
token aggregation, and a per-token loss is averaged over the sequence's tokens for ``sequence``.

``info.num_sequences`` (B') and ``info.num_tokens`` (N) are the caller's global counts when given,
so that summing the losses of the parts of a split batch gives the gradient of the whole batch.
"""

from __future__ import annotations

from .._registry import Registry

AGGREGATIONS = Registry("aggregation")


@AGGREGATIONS.register("seq_mean_token_mean", level="token")
def seq_mean_token_mean(L, info):
    # GRPO (tutorial sec. 6): (1/B') sum_i (1/|y_i|) sum_t L_it; empty responses give 0, never 0/0
    return ((L * info.mask).sum(1) / info.lengths.clamp_min(1.0)).sum() / info.num_sequences


@AGGREGATIONS.register("token_mean", level="token")
def token_mean(L, info):
    # DAPO / BNPO token-level loss (tutorial sec. 7.2): sum_{i,t} L_it / N
    return (L * info.mask).sum() / info.num_tokens


@AGGREGATIONS.register("seq_mean_token_sum_norm", level="token", uses_generation_limit=True)
def seq_mean_token_sum_norm(L, info, *, max_tokens=None):
    # Dr.GRPO (tutorial sec. 7.2): sum_{i,t} L_it / (B' * max_tokens), max_tokens = generation limit
    max_tokens = max_tokens if max_tokens is not None else info.T
    return (L * info.mask).sum() / (info.num_sequences * max_tokens)


@AGGREGATIONS.register("seq_mean_token_sum", level="token")
def seq_mean_token_sum(L, info):
    # sum_{i,t} L_it / B'
    return (L * info.mask).sum() / info.num_sequences


@AGGREGATIONS.register("sequence", level="sequence")
def sequence(L, info):
    # GSPO / SNIB (SNIB Alg. 1 line 10): (1/B') sum_i L_i, one loss per sequence
    return L.sum() / info.num_sequences


__all__ = ["AGGREGATIONS"]
