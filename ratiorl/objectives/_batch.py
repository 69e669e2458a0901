"""Per-call batch bookkeeping shared by the axes: mask, lengths, positions, groups, counts."""

from __future__ import annotations

import torch


class BatchInfo:
    """What every axis may need to know about the batch of one objective call.

    Attributes are computed once per call; ``pos`` and ``group_index`` lazily (only the axes that
    need them pay for them).
    """

    def __init__(self, mask_f: torch.Tensor, group_ids, num_tokens, num_sequences, n_dropped: int,
                 log_ratio_clamp: float = 20.0):
        self.log_ratio_clamp = log_ratio_clamp  # the objective's clamp on per-token log-ratios
        self.mask = mask_f  # (B, T) float32, 1 on counted tokens
        self.mask_bool = mask_f > 0
        self.B, self.T = mask_f.shape
        self.lengths = mask_f.sum(1)  # (B,) float32
        self.seq_valid = self.lengths > 0  # (B,) bool: non-empty (and not dropped) responses
        self.group_ids = group_ids
        self.n_dropped = n_dropped
        # B' (sequences) and N (tokens) of the aggregations (global counts if the caller passed them).
        self.num_sequences = num_sequences if num_sequences is not None else max(self.B - n_dropped, 1)
        self.num_sequences_given = num_sequences is not None
        self.old_logp = None  # (B, T) log pi_old, detached (set by the objective call)
        self.num_tokens = num_tokens if num_tokens is not None else self.lengths.sum().clamp_min(1.0)
        self._pos = None
        self._right_padded = None
        self._groups = None

    @property
    def pos(self) -> torch.Tensor:
        """1-based count of valid tokens up to and including t: cumsum(m) (CTPO sec. 3.3)."""
        if self._pos is None:
            self._pos = torch.cumsum(self.mask, dim=1)
        return self._pos

    def pos_pow(self, p: float) -> torch.Tensor:
        """pos_t ** p, broadcastable to (B, T) and exact on valid tokens.

        For the usual right-padded mask (valid tokens first), pos_t = t + 1 on every valid token,
        so this is one (1, T) row; otherwise cumsum(m) ** p.
        """
        if self._right_padded is None:
            # a 0/1 row with L ones has sum_t t*m_t >= L(L-1)/2, with equality iff the ones are t < L;
            # one matrix-vector product, exact in float32 while T(T-1)/2 < 2^24
            self._right_padded = False
            if self.T * (self.T - 1) / 2 < 2**24:
                ar = torch.arange(self.T, device=self.mask.device, dtype=self.mask.dtype)
                L = self.lengths
                self._right_padded = bool(((self.mask @ ar) == L * (L - 1) / 2).all())
        if self._right_padded:
            return torch.arange(1, self.T + 1, device=self.mask.device, dtype=self.mask.dtype).pow(p)[None, :]
        return self.pos.pow(p)

    def group_index(self, scope: str = "group"):
        """(index (B,) long in [0, G), G) for the sequences sharing a normaliser."""
        if scope == "batch":
            return torch.zeros(self.B, dtype=torch.long, device=self.mask.device), 1
        if self._groups is None:
            if self.group_ids is None:
                raise ValueError(
                    "this objective normalises weights within groups and needs group_ids (B,) "
                    "(which prompt each sequence answers); pass group_ids=... or set "
                    "normalize_scope='batch'"
                )
            uniq, inv = torch.unique(self.group_ids, return_inverse=True)
            self._groups = (inv, int(uniq.numel()))
        return self._groups

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean over valid tokens of a (B, T) tensor; 0 for empty responses."""
        return (x * self.mask).sum(1) / self.lengths.clamp_min(1.0)
