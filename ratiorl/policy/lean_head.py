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
"""

from __future__ import annotations

import torch

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_CHUNK = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 accumulation for every low-precision input; float64 stays float64 (tests).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tile_logits(h, W, b, v0, v1, temperature, cdtype):
    """Tempered logits of one (token chunk, vocab chunk) tile, eq. (1), in cdtype.

    ``h`` is already in cdtype; low-precision weights are upcast per chunk so that bf16/fp16
    models get float32 logits (not logits rounded to 8 mantissa bits).
    """
    z = h @ W[v0:v1].to(cdtype).T
    if b is not None:
        z = z + b[v0:v1].to(cdtype)
    if temperature != 1.0:
        z = z / temperature
    return z


def _target_logits(h, W, b, targets, temperature, cdtype):
    """z_{n, y_n}: row-wise dot product with the gathered target rows of W."""
    zt = (h.to(cdtype) * W[targets].to(cdtype)).sum(-1)
    if b is not None:
        zt = zt + b[targets].to(cdtype)
    return zt / temperature


def _forward_stats(h, W, b, ref_h, ref_W, ref_b, temperature, with_ref, vocab_chunk, token_chunk, cdtype):
    """Online pass over the vocabulary for every token chunk.

    Per row we keep (all relative to running maxima m, mq so nothing overflows):
        s  = sum_v exp(z_v - m)                  -> lse  = m + log s
        a  = sum_v exp(z_v - m) (z_v - m)        -> E_p[z] - lse = a/s - log s
        sq = sum_v exp(zq_v - mq)                -> lseq = mq + log sq
        c  = sum_v exp(z_v - m) (zq_v - mq)      -> E_p[zq] - lseq = c/s - log sq
    When a new chunk raises m to m' the old sums are rescaled by exp(m - m'), and the shifted
    sums pick up the shift: a' = e^{m-m'} (a + (m - m') s), c' likewise with mq - mq'.
    """
    N, V = h.shape[0], W.shape[0]
    lse = torch.empty(N, dtype=cdtype, device=h.device)
    neg_ent = torch.empty(N, dtype=cdtype, device=h.device)  # E_p[z] - lse = sum p log p
    lseq = torch.empty(N, dtype=cdtype, device=h.device) if with_ref else None
    cross = torch.empty(N, dtype=cdtype, device=h.device) if with_ref else None  # sum p log q

    for n0 in range(0, N, token_chunk):
        n1 = min(N, n0 + token_chunk)
        hc = h[n0:n1].to(cdtype)
        rc = ref_h[n0:n1].to(cdtype) if with_ref else None
        m = s = a = mq = sq = c = None
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            z = _tile_logits(hc, W, b, v0, v1, temperature, cdtype)
            m_new = z.max(dim=1).values if m is None else torch.maximum(m, z.max(dim=1).values)
            zs = z - m_new[:, None]  # z - m'
            e = zs.exp()
            if with_ref:
                zq = _tile_logits(rc, ref_W, ref_b, v0, v1, temperature, cdtype)
                mq_new = zq.max(dim=1).values if mq is None else torch.maximum(mq, zq.max(dim=1).values)
                zqs = zq - mq_new[:, None]
                del zq
            if m is None:
                s = e.sum(1)
                a = (e * zs).sum(1)
                if with_ref:
                    sq = zqs.exp().sum(1)
                    c = (e * zqs).sum(1)
            else:
                scale = (m - m_new).exp()
                s_old = s
                s = s * scale + e.sum(1)
                a = scale * (a + (m - m_new) * s_old) + (e * zs).sum(1)
                if with_ref:
                    sq = sq * (mq - mq_new).exp() + zqs.exp().sum(1)
                    c = scale * (c + (mq - mq_new) * s_old) + (e * zqs).sum(1)
            m = m_new
            if with_ref:
                mq = mq_new
            del z, zs, e
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
                vocab_chunk, token_chunk):
        cdtype = _compute_dtype(h)
        with torch.no_grad():
            lse, neg_ent, lseq, cross = _forward_stats(
                h, W, b, ref_h, ref_W, ref_b, temperature, with_kl, vocab_chunk, token_chunk, cdtype
            )
            logp = _target_logits(h, W, b, targets, temperature, cdtype) - lse  # eq. (2)
            entropy = -neg_ent  # eq. (3)
            kl = (neg_ent - cross) if with_kl else None  # eq. (4)
            # log q(y_n) comes for free from the reference log-sum-exp of the same pass
            ref_logp = (_target_logits(ref_h, ref_W, ref_b, targets, temperature, cdtype) - lseq) if with_kl else None
        ctx.save_for_backward(h, W, b, targets, ref_h, ref_W, ref_b, lse, entropy,
                              lseq if with_kl else None, kl)
        ctx.temperature = temperature
        ctx.with_kl = with_kl
        ctx.chunks = (vocab_chunk, token_chunk)
        ctx.set_materialize_grads(False)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        return logp, (entropy if with_entropy else None), kl, ref_logp

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl, _g_ref_logp):
        h, W, b, targets, ref_h, ref_W, ref_b, lse, entropy, lseq, kl = ctx.saved_tensors
        T = ctx.temperature
        vocab_chunk, token_chunk = ctx.chunks
        need_h, need_W, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_h or need_W or need_b) or (g_logp is None and g_ent is None and g_kl is None):
            return (None,) * 12
        cdtype = lse.dtype
        N, V = h.shape[0], W.shape[0]
        grad_h = torch.zeros(h.shape, dtype=cdtype, device=h.device) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=cdtype, device=W.device) if need_W else None
        grad_b = torch.zeros(V, dtype=cdtype, device=W.device) if need_b else None
        gl = g_logp.to(cdtype) if g_logp is not None else None
        ge = g_ent.to(cdtype) if g_ent is not None else None
        gk = g_kl.to(cdtype) if (g_kl is not None and ctx.with_kl) else None

        # One-hot part of eq. (5): dz_{n,y_n} += g_logp_n.
        if gl is not None:
            hc, Wt = h.to(cdtype), W[targets].to(cdtype)
            if need_h:
                grad_h += gl[:, None] * Wt / T
            if need_W:
                grad_W.index_add_(0, targets, gl[:, None] * hc / T)
            if need_b:
                grad_b.index_add_(0, targets, gl / T)
            del hc, Wt

        # Dense part: dz_v = p_v * coef_v with, from (5)-(7),
        #   coef_v = -g_logp - g_ent (log p_v + H) + g_kl (log p_v - log q_v - KL).
        for n0 in range(0, N, token_chunk):
            n1 = min(N, n0 + token_chunk)
            hc = h[n0:n1].to(cdtype)
            lse_c = lse[n0:n1, None]
            H_c = entropy[n0:n1, None]
            gl_c = gl[n0:n1, None] if gl is not None else None
            ge_c = ge[n0:n1, None] if ge is not None else None
            gk_c = gk[n0:n1, None] if gk is not None else None
            if gk is not None:
                rc, lseq_c, kl_c = ref_h[n0:n1].to(cdtype), lseq[n0:n1, None], kl[n0:n1, None]
            for v0 in range(0, V, vocab_chunk):
                v1 = min(V, v0 + vocab_chunk)
                logp_v = _tile_logits(hc, W, b, v0, v1, T, cdtype).sub_(lse_c)  # log p_v
                p = logp_v.exp()
                coef = torch.zeros_like(logp_v) if gl_c is None else (-gl_c).expand_as(logp_v).clone()
                if ge_c is not None:
                    coef -= ge_c * (logp_v + H_c)
                if gk_c is not None:
                    logq_v = _tile_logits(rc, ref_W, ref_b, v0, v1, T, cdtype).sub_(lseq_c)
                    coef += gk_c * (logp_v - logq_v - kl_c)
                    del logq_v
                dz = p.mul_(coef).div_(T)  # includes dz/d(logits) = 1/T of eq. (1)
                del logp_v, coef
                if need_h:
                    grad_h[n0:n1] += dz @ W[v0:v1].to(cdtype)
                if need_W:
                    grad_W[v0:v1] += dz.T @ hc
                if need_b:
                    grad_b[v0:v1] += dz.sum(0)
                del dz

        return (
            grad_h.to(h.dtype) if need_h else None,
            grad_W.to(W.dtype) if need_W else None,
            grad_b.to(b.dtype) if need_b else None,
            None, None, None, None, None, None, None, None, None,
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
        vocab_chunk, token_chunk: tile sizes; never more than token_chunk x vocab_chunk
            floats of logits exist at once.

        return_ref_logp: with ``with_kl``, also return log pi_ref(y_n) (no gradient), which
            the KL pass computes anyway.

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
        bool(with_entropy), bool(with_kl), int(vocab_chunk), int(token_chunk),
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
