"""Input checks of an objective call: shapes and dtypes, and NaN/inf on valid positions."""

from __future__ import annotations

import torch


def handle_nonfinite(policy: str, logp, old_logp, advantages, ref_logp, token_kl, maskf):
    valid = maskf > 0
    bad_rows = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "ref_logp": ref_logp,
             "token_kl": token_kl}
    clean = {}
    for name, t in named.items():
        if t is None:
            clean[name] = None
            continue
        finite = torch.isfinite(t.detach())
        bad = ~finite & valid if t.dim() == 2 else ~finite
        rows = bad.any(1) if t.dim() == 2 else bad
        if bool(rows.any()) and policy == "raise":
            idx = rows.nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"{name} contains NaN/inf at {int(bad.sum())} valid position(s) (rows {idx}"
                f"{'...' if int(rows.sum()) > 8 else ''}); fix the input or pass nonfinite='mask' to "
                "drop those sequences"
            )
        bad_rows |= rows
        clean[name] = torch.where(finite, t, torch.zeros_like(t))  # also cleans padding
    maskf = maskf * (~bad_rows).to(maskf.dtype)[:, None]
    return (clean["logp"], clean["old_logp"], clean["advantages"], clean["ref_logp"], clean["token_kl"],
            maskf, int(bad_rows.sum()))


def check_inputs(logp, old_logp, advantages, mask, group_ids, ref_logp, token_kl, num_tokens, num_sequences):
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    B = shape[0]
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("token_kl", token_kl)):
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has shape {shape}; both must be (B, T)")
    if tuple(advantages.shape) not in ((B,), shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected (B,) = ({B},) or (B, T) = {shape}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp),
                    ("token_kl", token_kl)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or float (0/1), got dtype {mask.dtype}")
    check_mask_values(mask)
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor) or tuple(group_ids.shape) != (B,):
            got = tuple(group_ids.shape) if isinstance(group_ids, torch.Tensor) else type(group_ids).__name__
            raise ValueError(f"group_ids must be a (B,) = ({B},) tensor of ints, got {got}")
        if group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    for name, v in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
            v = v.item()  # one sync per call; a zero or NaN count would silently give inf/NaN losses
        if not 0 < v < float("inf"):  # also false for NaN
            raise ValueError(f"{name} must be a finite number > 0 when given, got {v}")


def check_mask_values(mask) -> None:
    """A mask holds 0 and 1 only (bool, int or float): no NaN, no soft weights."""
    if mask.dtype == torch.bool:
        return
    bad = (mask != 0) & (mask != 1)  # NaN too: it compares unequal to both
    if bool(bad.any()):
        if mask.is_floating_point() and bool(torch.isnan(mask).any()):
            raise ValueError(f"mask contains NaN at {int(torch.isnan(mask).sum())} position(s); it must hold 0/1 only")
        raise ValueError(f"mask must hold 0/1 only, got {int(bad.sum())} other value(s), e.g. "
                         f"{mask[bad].flatten()[0].item()}")
