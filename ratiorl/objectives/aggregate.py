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


def _b(info, count_empty):
    """B': every (kept) sequence, or -- count_empty=False, verl's convention -- the non-empty ones,
    unless the caller passed num_sequences."""
    if count_empty or info.num_sequences_given:
        return info.num_sequences
    return info.seq_valid.sum().clamp_min(1)


@AGGREGATIONS.register("seq_mean_token_mean", level="token")
def seq_mean_token_mean(L, info, *, count_empty: bool = True):
    # GRPO (tutorial sec. 6): (1/B') sum_i (1/|y_i|) sum_t L_it; empty responses give 0, never 0/0
    return ((L * info.mask).sum(1) / info.lengths.clamp_min(1.0)).sum() / _b(info, count_empty)


@AGGREGATIONS.register("token_mean", level="token")
def token_mean(L, info):
    # DAPO / BNPO token-level loss (tutorial sec. 7.2): sum_{i,t} L_it / N
    return (L * info.mask).sum() / info.num_tokens


@AGGREGATIONS.register("seq_mean_token_sum_norm", level="token", uses_generation_limit=True)
def seq_mean_token_sum_norm(L, info, *, max_tokens=None, count_empty: bool = True):
    # Dr.GRPO (tutorial sec. 7.2): sum_{i,t} L_it / (B' * max_tokens), max_tokens = generation limit
    max_tokens = max_tokens if max_tokens is not None else info.T
    return (L * info.mask).sum() / (_b(info, count_empty) * max_tokens)


@AGGREGATIONS.register("seq_mean_token_sum", level="token")
def seq_mean_token_sum(L, info, *, count_empty: bool = True):
    # sum_{i,t} L_it / B' (LUSPO: a sequence loss weighted by its length, TRL loss_type="luspo")
    return (L * info.mask).sum() / _b(info, count_empty)


@AGGREGATIONS.register("token_sum", level="token")
def token_sum(L, info):
    # sum_{i,t} L_it, no normaliser (verl loss_agg_mode="token-sum")
    return (L * info.mask).sum()


@AGGREGATIONS.register("sequence", level="sequence")
def sequence(L, info, *, count_empty: bool = True):
    # GSPO / SNIB (SNIB Alg. 1 line 10): (1/B') sum_i L_i, one loss per sequence
    return L.sum() / _b(info, count_empty)


__all__ = ["AGGREGATIONS"]
