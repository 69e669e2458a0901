"""Small tensor helpers shared by the axes."""

from __future__ import annotations

import torch


class _MaskedClamp(torch.autograd.Function):
    """clamp(x, lower, upper) with the gradient passed where ``inside`` (0 outside the bounds).

    Same value and gradient as ``torch.clamp``; its backward is one multiply by a 0/1 mask the
    caller already has (the clip metrics need the same masks), instead of torch.clamp's
    compare/compare/and/where backward, which dominates the cost of a clipped loss on CPU.
    """

    @staticmethod
    def forward(ctx, x, lower, upper, inside):
        ctx.save_for_backward(inside)
        if isinstance(lower, torch.Tensor):
            return torch.maximum(torch.minimum(x, upper), lower)
        return torch.clamp(x, lower, upper)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def masked_clamp(x: torch.Tensor, lower, upper, inside: torch.Tensor) -> torch.Tensor:
    """``clamp(x, lower, upper)``; ``inside`` (bool) must be ``lower <= x <= upper`` (broadcastable)."""
    return _MaskedClamp.apply(x, lower, upper, inside.to(x.dtype))


def clamp_abs(x: torch.Tensor, c: float) -> torch.Tensor:
    """``clamp(x, -c, c)`` with torch.clamp's gradient (0 where |x| > c), cheaper backward."""
    return masked_clamp(x, -c, c, x.detach().abs() <= c)
