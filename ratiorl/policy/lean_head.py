"""Memory-lean LM head: per-token log-prob, entropy and exact KL without an N x V tensor.

For N token positions with final hidden states h (N, H), an output embedding W (V, H) and
optional bias b (V,), the tempered logits are

    z_{n,v} = (h_n . W_v + b_v) / T                                             (1)

and we need, per position n and for the sampled target y_n,

    logp_n = z_{n,y_n} - lse_n,            lse_n = log sum_v exp z_{n,v}        (2)
    H_n    = -sum_v p_{n,v} log p_{n,v}  = lse_n - E_p[z_n]                     (3)
    KL_n   = sum_v p_{n,v} (log p_{n,v} - log q_{n,v})                          (4)
           = (E_p[z_n] - lse_n) - (E_p[zq_n] - lseq_n)

where q is the reference policy with its own logits zq (from ref_hidden / ref_weight).

A naive implementation materialises z (N x V floats: 1 GB for 8k tokens and a 32k vocabulary),
then log_softmax, softmax, and the same again for the reference. Here the vocabulary is
streamed in chunks with an online log-sum-exp (float32), the tokens are processed in chunks,
and only O(N) statistics are saved for the backward pass, which recomputes every tile. The
gradients with respect to the logits of one row are

    d logp / dz_v = 1[v = y] - p_v                                              (5)
    d H    / dz_v = -p_v (log p_v + H)                                          (6)
    d KL   / dz_v =  p_v (log p_v - log q_v - KL)         (q held fixed)        (7)

and dz/dh = W/T, dz/dW = h/T, dz/db = 1/T (1). The one-hot part of (5) is applied with one
gather / index_add outside the tile loop.

``matmul_dtype=torch.bfloat16`` (mixed precision) runs the tile matmuls of (1) and of the
backward with bfloat16 inputs (h/T and W cast once per call): each logit is rounded to bfloat16
once, as a bfloat16 LM head's logits are, while the online log-sum-exp, the sums of (2)-(4), the
coefficients of (5)-(7) and the gradient accumulators stay float32.
"""

from __future__ import annotations

import weakref

import torch

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_CHUNK = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 accumulation for every low-precision input; float64 stays float64 (tests).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tile_logits(hs, W, bs, v0, v1, cdtype, out, low=None):
    """Tempered logits of one (token chunk, vocab chunk) tile, eq. (1), written into ``out``.

    The temperature is folded into the (small) inputs: hs = h / T and bs = b / T, so that
    z = hs W^T + bs costs one matmul and no extra pass over the tile. Low-precision weights are
    upcast per chunk so that bf16/fp16 models get float32 logits. Writing into a preallocated
    buffer matters on CPU: a fresh 32 MB tensor per tile costs more in page faults than the
    elementwise work done on it. When ``hs`` and ``W`` are in a lower matmul dtype (mixed
    precision) the product goes to the buffer ``low`` of that dtype and is copied into ``out``.
    """
    if hs.dtype != cdtype:
        out.copy_(torch.mm(hs, W[v0:v1].T, out=low))
        return out if bs is None else out.add_(bs[v0:v1])
    Wc = W[v0:v1].to(cdtype)
    if bs is None:
        return torch.mm(hs, Wc.T, out=out)
    return torch.addmm(bs[v0:v1], hs, Wc.T, out=out)


class _Workspace:
    """Reusable tile buffers: ``tile(k, rows, cols)`` is a contiguous (rows, cols) view."""

    def __init__(self, n, rows, cols, dtype, device, low_dtype=None):
        self.bufs = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(n)]
        self.low = torch.empty(rows * cols, dtype=low_dtype, device=device) if low_dtype is not None else None

    def tile(self, k, rows, cols):
        return self.bufs[k][: rows * cols].view(rows, cols)

    def low_tile(self, rows, cols):
        """A (rows, cols) buffer in the matmul dtype (None without mixed precision)."""
        return self.low[: rows * cols].view(rows, cols) if self.low is not None else None


def _scaled(h, b, temperature, cdtype, mdtype=None):
    """(h / T, b / T) in the compute dtype; h / T in ``mdtype`` when the matmuls run in it."""
    hs = h.to(cdtype) / temperature
    bs = b.to(cdtype) / temperature if b is not None else None
    return (hs.to(mdtype) if mdtype is not None else hs), bs


def _matmul_dtype(matmul_dtype, cdtype):
    """The tile matmuls' dtype when it differs from the compute dtype, else None."""
    return matmul_dtype if matmul_dtype is not None and matmul_dtype != cdtype else None


# Casts of frozen CPU weights (``requires_grad`` False: the tied output head of a LoRA model, a
# frozen reference head) to the matmul dtype, kept while the weight lives: storage address -> (weak
# reference to the weight, its version, dtype, shape and strides, the cast). Casting SmolLM2's
# 49,152 x 576 head to bf16 took 15 ms in a training process here (2 threads), once in the forward
# and once in the backward of every step; the kept cast costs 56 MB. On an accelerator the cast
# takes microseconds and memory is scarce, so it is made at every call there.
_FROZEN_CASTS: dict = {}


def _matmul_weight(W, mdtype):
    """W as the tile matmuls read it: cast once to ``mdtype`` for mixed precision. The cast of a
    frozen weight is reused for as long as the weight lives with the same storage and version
    (an in-place change bumps the version; a weight that trains, or is not on the CPU, is cast at
    every call)."""
    if mdtype is None or W is None or W.dtype == mdtype:
        return W
    addr = W.data_ptr()
    if W.requires_grad or W.device.type != "cpu":
        _FROZEN_CASTS.pop(addr, None)
        return W.to(mdtype)
    key = (W._version, mdtype, tuple(W.shape), W.stride())
    hit = _FROZEN_CASTS.get(addr)
    if hit is not None:
        owner = hit[0]()
        if owner is not None and owner.data_ptr() == addr and hit[1] == key:
            return hit[2]
    for a in [a for a, entry in _FROZEN_CASTS.items() if entry[0]() is None]:  # weights freed since
        del _FROZEN_CASTS[a]
    Wm = W.to(mdtype)
    _FROZEN_CASTS[addr] = (weakref.ref(W), key, Wm)
    return Wm


def _reference_matmul_weight(W, Wm, ref_W, mdtype):
    """The reference head for the matmuls: ``Wm`` again when it is the policy's head (a LoRA
    reference with adapters disabled; ``ref_W`` is then a detached view of the same storage)."""
    if ref_W is None:
        return None
    same = ref_W.data_ptr() == W.data_ptr() and ref_W.shape == W.shape and ref_W.stride() == W.stride()
    return Wm if same and ref_W.dtype == W.dtype else _matmul_weight(ref_W, mdtype)


def _target_logits(hs, W, bs, targets, cdtype):
    """z_{n, y_n}: row-wise dot product of h/T with the gathered target rows of W (the matmul's
    inputs, so that it is the tile's entry before the tile's rounding, accumulated in cdtype)."""
    zt = torch.linalg.vecdot(hs.to(cdtype), W[targets].to(cdtype))
    if bs is not None:
        zt = zt + bs[targets]
    return zt


def _forward_stats(hs, W, bs, ref_hs, ref_W, ref_bs, with_ref, vocab_chunk, token_chunk, cdtype, mdtype=None):
    """Online pass over the vocabulary for every token chunk.

    Per row we keep (all relative to running maxima m, mq so nothing overflows):
        s  = sum_v exp(z_v - m)                  -> lse  = m + log s
        a  = sum_v exp(z_v - m) (z_v - m)        -> E_p[z] - lse = a/s - log s
        sq = sum_v exp(zq_v - mq)                -> lseq = mq + log sq
        c  = sum_v exp(z_v - m) (zq_v - mq)      -> E_p[zq] - lseq = c/s - log sq
    When a new chunk raises m to m' the old sums are rescaled by exp(m - m'), and the shifted
    sums pick up the shift: a' = e^{m-m'} (a + (m - m') s), c' likewise with mq - mq'.
    """
    N, V = hs.shape[0], W.shape[0]
    lse = torch.empty(N, dtype=cdtype, device=hs.device)
    neg_ent = torch.empty(N, dtype=cdtype, device=hs.device)  # E_p[z] - lse = sum p log p
    lseq = torch.empty(N, dtype=cdtype, device=hs.device) if with_ref else None
    cross = torch.empty(N, dtype=cdtype, device=hs.device) if with_ref else None  # sum p log q

    ws = _Workspace(3, min(N, token_chunk), min(V, vocab_chunk), cdtype, hs.device, mdtype)
    for n0 in range(0, N, token_chunk):
        n1 = min(N, n0 + token_chunk)
        hc = hs[n0:n1]
        rc = ref_hs[n0:n1] if with_ref else None
        m = s = a = mq = sq = c = None
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            low = ws.low_tile(n1 - n0, v1 - v0)
            zs = _tile_logits(hc, W, bs, v0, v1, cdtype, ws.tile(0, n1 - n0, v1 - v0), low)
            m_new = zs.amax(dim=1) if m is None else torch.maximum(m, zs.amax(dim=1))
            zs.sub_(m_new[:, None])  # z - m'
            e = torch.exp(zs, out=ws.tile(1, n1 - n0, v1 - v0))
            s_tile = e.sum(1)
            a_tile = zs.mul_(e).sum(1)  # sum_v e_v (z_v - m'); zs is not needed afterwards
            if with_ref:
                zqs = _tile_logits(rc, ref_W, ref_bs, v0, v1, cdtype, ws.tile(2, n1 - n0, v1 - v0), low)
                mq_new = zqs.amax(dim=1) if mq is None else torch.maximum(mq, zqs.amax(dim=1))
                zqs.sub_(mq_new[:, None])  # zq - mq'
                c_tile = torch.mul(e, zqs, out=ws.tile(0, n1 - n0, v1 - v0)).sum(1)
                sq_tile = zqs.exp_().sum(1)
            if m is None:
                s, a = s_tile, a_tile
                if with_ref:
                    sq, c = sq_tile, c_tile
            else:
                scale = (m - m_new).exp()
                s_old = s
                s = s * scale + s_tile
                a = scale * (a + (m - m_new) * s_old) + a_tile
                if with_ref:
                    sq = sq * (mq - mq_new).exp() + sq_tile
                    c = scale * (c + (mq - mq_new) * s_old) + c_tile
            m = m_new
            if with_ref:
                mq = mq_new
        log_s = s.log()
        lse[n0:n1] = m + log_s
        neg_ent[n0:n1] = a / s - log_s
        if with_ref:
            log_sq = sq.log()
            lseq[n0:n1] = mq + log_sq
            cross[n0:n1] = c / s - log_sq
    return lse, neg_ent, lseq, cross


class _LeanHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, b, targets, ref_h, ref_W, ref_b, temperature, with_entropy, with_kl,
                vocab_chunk, token_chunk, matmul_dtype):
        cdtype = _compute_dtype(h)
        mdtype = _matmul_dtype(matmul_dtype, cdtype)
        with torch.no_grad():
            hs, bs = _scaled(h, b, temperature, cdtype, mdtype)
            ref_hs, ref_bs = _scaled(ref_h, ref_b, temperature, cdtype, mdtype) if with_kl else (None, None)
            Wm = _matmul_weight(W, mdtype)
            ref_Wm = _reference_matmul_weight(W, Wm, ref_W, mdtype)
            lse, neg_ent, lseq, cross = _forward_stats(
                hs, Wm, bs, ref_hs, ref_Wm, ref_bs, with_kl, vocab_chunk, token_chunk, cdtype, mdtype
            )
            logp = _target_logits(hs, Wm, bs, targets, cdtype) - lse  # eq. (2)
            entropy = -neg_ent  # eq. (3)
            kl = (neg_ent - cross) if with_kl else None  # eq. (4)
            # log q(y_n) comes for free from the reference log-sum-exp of the same pass
            ref_logp = (_target_logits(ref_hs, ref_Wm, ref_bs, targets, cdtype) - lseq) if with_kl else None
        ctx.save_for_backward(h, W, b, targets, ref_h, ref_W, ref_b, lse, entropy,
                              lseq if with_kl else None, kl)
        ctx.temperature = temperature
        ctx.with_kl = with_kl
        ctx.chunks = (vocab_chunk, token_chunk)
        ctx.mdtype = mdtype
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(targets)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        return logp, (entropy if with_entropy else None), kl, ref_logp

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl, _g_ref_logp):
        h, W, b, targets, ref_h, ref_W, ref_b, lse, entropy, lseq, kl = ctx.saved_tensors
        T = ctx.temperature
        vocab_chunk, token_chunk = ctx.chunks
        need_h, need_W, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if ctx.with_kl is False:
            g_kl = None
        if not (need_h or need_W or need_b) or (g_logp is None and g_ent is None and g_kl is None):
            return (None,) * 13
        cdtype, mdtype = lse.dtype, ctx.mdtype
        N, V = h.shape[0], W.shape[0]
        hs, bs = _scaled(h, b, T, cdtype, mdtype)
        ref_hs, ref_bs = _scaled(ref_h, ref_b, T, cdtype, mdtype) if g_kl is not None else (None, None)
        Wm = _matmul_weight(W, mdtype)
        ref_Wm = _reference_matmul_weight(W, Wm, ref_W, mdtype) if g_kl is not None else None
        # grad_h and grad_b are accumulated without the 1/T of eq. (1) and scaled once at the end;
        # grad_W uses hs = h/T, which already carries it.
        grad_h = torch.zeros(h.shape, dtype=cdtype, device=h.device) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=cdtype, device=W.device) if need_W else None
        grad_b = torch.zeros(V, dtype=cdtype, device=W.device) if need_b else None
        zeros = torch.zeros(N, dtype=cdtype, device=h.device)
        gl = g_logp.to(cdtype) if g_logp is not None else zeros
        ge = g_ent.to(cdtype) if g_ent is not None else zeros
        gk = g_kl.to(cdtype) if g_kl is not None else zeros

        # One-hot part of eq. (5): dz_{n,y_n} += g_logp_n.
        if g_logp is not None:
            if need_h:
                grad_h += gl[:, None] * Wm[targets].to(cdtype)
            if need_W:
                grad_W.index_add_(0, targets, gl[:, None] * hs.to(cdtype))
            if need_b:
                grad_b.index_add_(0, targets, gl)

        # Dense part: dz_v = p_v * coef_v with, from (5)-(7),
        #   coef_v = -g_logp - g_ent (log p_v + H) + g_kl (log p_v - log q_v - KL)
        #          = c0 + c1 log p_v + c2 log q_v,
        #   c0 = -g_logp - g_ent H - g_kl KL,   c1 = g_kl - g_ent,   c2 = -g_kl.
        c0 = -gl - ge * entropy
        if g_kl is not None:
            c0 = c0 - gk * kl
        c1 = gk - ge
        c2 = -gk
        use_c1 = g_ent is not None or g_kl is not None
        ws = _Workspace(3, min(N, token_chunk), min(V, vocab_chunk), cdtype, h.device, mdtype)
        for n0 in range(0, N, token_chunk):
            n1 = min(N, n0 + token_chunk)
            hc = hs[n0:n1]
            lse_c = lse[n0:n1, None]
            c0_c, c1_c, c2_c = c0[n0:n1, None], c1[n0:n1, None], c2[n0:n1, None]
            if g_kl is not None:
                rc, lseq_c = ref_hs[n0:n1], lseq[n0:n1, None]
            for v0 in range(0, V, vocab_chunk):
                v1 = min(V, v0 + vocab_chunk)
                shape = (n1 - n0, v1 - v0)
                low = ws.low_tile(*shape)
                coef = _tile_logits(hc, Wm, bs, v0, v1, cdtype, ws.tile(0, *shape), low).sub_(lse_c)  # log p_v
                p = torch.exp(coef, out=ws.tile(1, *shape))
                if use_c1:
                    coef.mul_(c1_c).add_(c0_c)  # c0 + c1 log p_v
                else:
                    coef.copy_(c0_c.expand(shape))
                if g_kl is not None:
                    logq_v = _tile_logits(rc, ref_Wm, ref_bs, v0, v1, cdtype, ws.tile(2, *shape), low).sub_(lseq_c)
                    coef.addcmul_(c2_c, logq_v)  # + c2 log q_v
                dz = p.mul_(coef)  # dL/dz for this tile (before the 1/T of eq. (1))
                if mdtype is not None:  # mixed precision: the matmuls in mdtype, sums in cdtype
                    dzm = low.copy_(dz)
                    if need_h:
                        grad_h[n0:n1] += torch.mm(dzm, Wm[v0:v1])
                    if need_W:
                        grad_W[v0:v1] += torch.mm(dzm.T, hc)
                else:
                    if need_h:
                        grad_h[n0:n1].addmm_(dz, W[v0:v1].to(cdtype))
                    if need_W:
                        grad_W[v0:v1].addmm_(dz.T, hc)
                if need_b:
                    grad_b[v0:v1] += dz.sum(0)

        return (
            (grad_h / T).to(h.dtype) if need_h else None,
            grad_W.to(W.dtype) if need_W else None,
            (grad_b / T).to(b.dtype) if need_b else None,
            None, None, None, None, None, None, None, None, None, None,
        )


def lean_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    with_entropy: bool = False,
    with_kl: bool = False,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    return_ref_logp: bool = False,
    matmul_dtype: torch.dtype | None = None,
):
    """Per-token log pi(y_n), entropy and exact KL(pi || pi_ref) from hidden states.

    Args:
        hidden: (N, H) final hidden states of the positions that predict ``targets``.
        weight: (V, H) output embedding (the LM head); ``bias`` (V,) optional.
        targets: (N,) long token ids in [0, V).
        temperature: logits are divided by it (same as the sampler).
        ref_hidden, ref_weight, ref_bias: the reference policy's hidden states / head, needed
            when ``with_kl``. ``ref_weight`` defaults to ``weight`` (and ``ref_bias`` to
            ``bias``), as for a LoRA reference with the adapters disabled. No gradient flows
            into the reference.
        vocab_chunk, token_chunk: tile sizes; only a few token_chunk x vocab_chunk tiles of
            logits exist at any time (about 0.2 GB at the defaults, float32).
        return_ref_logp: with ``with_kl``, also return log pi_ref(y_n) (no gradient), which
            the KL pass computes anyway.
        matmul_dtype: None (the compute dtype: float32, float64 for float64 inputs) or a lower
            precision (``torch.bfloat16``) for the tile matmuls only; the log-sum-exp, entropy,
            KL and gradient accumulation stay in the compute dtype.

    Returns:
        (logp (N,), entropy (N,) or None, kl (N,) or None) in float32 (float64 if the inputs
        are float64); differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. With
        ``return_ref_logp`` a fourth element, ref_logp (N,).
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, Hd = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != Hd:
        raise ValueError(f"hidden size mismatch: hidden has H={Hd}, weight is {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != N:
        raise ValueError(f"targets must be (N,) = ({N},) to match hidden; got {tuple(targets.shape)}")
    if N == 0:
        raise ValueError("empty input: no token positions (N = 0); nothing to score")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    tmin, tmax = int(targets.min()), int(targets.max())
    if tmin < 0 or tmax >= V:
        raise ValueError(f"target token id out of range: ids span [{tmin}, {tmax}] but the vocabulary has V={V} rows")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be (V,) = ({V},); got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if matmul_dtype is not None and not (isinstance(matmul_dtype, torch.dtype) and matmul_dtype.is_floating_point):
        raise ValueError(f"matmul_dtype must be None or a floating-point torch.dtype, got {matmul_dtype!r}")
    if vocab_chunk < 1 or token_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, got vocab_chunk={vocab_chunk}, token_chunk={token_chunk}")
    if with_kl:
        if ref_hidden is None:
            raise ValueError("with_kl=True needs ref_hidden (the reference model's hidden states)")
        if ref_weight is None:
            ref_weight = weight
            ref_bias = bias if ref_bias is None else ref_bias
        if ref_hidden.shape[0] != N or ref_hidden.shape[1] != ref_weight.shape[1]:
            raise ValueError(
                f"ref_hidden {tuple(ref_hidden.shape)} does not match hidden {tuple(hidden.shape)} / ref_weight {tuple(ref_weight.shape)}"
            )
        if ref_weight.shape[0] != V:
            raise ValueError(f"reference vocabulary size {ref_weight.shape[0]} != policy vocabulary size {V}")
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = ref_bias.detach() if ref_bias is not None else None
    else:
        ref_hidden = ref_weight = ref_bias = None
    targets = targets.long()
    if return_ref_logp and not with_kl:
        raise ValueError("return_ref_logp=True needs with_kl=True (and ref_hidden)")
    logp, ent, kl, ref_logp = _LeanHeadFn.apply(
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, float(temperature),
        bool(with_entropy), bool(with_kl), int(vocab_chunk), int(token_chunk), matmul_dtype,
    )
    if return_ref_logp:
        return logp, ent, kl, ref_logp
    return logp, ent, kl


def naive_token_stats(hidden, weight, targets, *, bias=None, temperature=1.0, ref_hidden=None,
                      ref_weight=None, ref_bias=None, with_entropy=False, with_kl=False):
    """Reference implementation that materialises the full (N, V) logits (tests, benchmark)."""
    cdtype = _compute_dtype(hidden)
    z = torch.nn.functional.linear(hidden, weight, bias).to(cdtype) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1) if with_entropy else None
    kl = None
    if with_kl:
        if ref_weight is None:  # same defaults as lean_token_stats
            ref_weight = weight
            ref_bias = bias if ref_bias is None else ref_bias
        with torch.no_grad():
            zq = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias).to(cdtype) / temperature
            logq_all = torch.log_softmax(zq, dim=-1)
        kl = (p * (logp_all - logq_all)).sum(-1)
    return logp, entropy, kl
