"""The streaming head against a float64 full-logits reference, in value and gradient."""

import pytest
import torch

from ratiorl.policy import lean_token_stats, naive_token_stats


def make_inputs(N, H, V, *, seed, dtype=torch.float32, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * scale).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    ref_h = h.detach() + 0.3 * torch.randn(N, H, generator=g).to(dtype)
    ref_W = W.detach() + 0.3 * torch.randn(V, H, generator=g).to(dtype) / H**0.5
    targets = torch.randint(0, V, (N,), generator=g)
    up = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]  # upstream grads
    return h, W, b, ref_h, ref_W, targets, up


def grads_of(outs, up, params):
    loss = sum((o.double() * u).sum() for o, u in zip(outs, up) if o is not None)
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def f64(t):
    return None if t is None else t.detach().double().requires_grad_()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunks", [(1000, 1000), (16, 8), (7, 5), (13, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(temperature, chunks, bias):
    N, H, V = 37, 24, 64  # vocab chunks 16/7/13 divide / don't divide V; token chunks 8/5 vs N
    seed = hash((temperature, chunks, bias)) % 10_000
    h, W, b, ref_h, ref_W, t, up = make_inputs(N, H, V, seed=seed, bias=bias)
    vc, tc = chunks
    out = lean_token_stats(h, W, t, bias=b, temperature=temperature, ref_hidden=ref_h, ref_weight=ref_W,
                           with_entropy=True, with_kl=True, vocab_chunk=vc, token_chunk=tc)
    assert all(o.dtype == torch.float32 and o.shape == (N,) for o in out)
    h64, W64, b64 = f64(h), f64(W), f64(b)
    ref = naive_token_stats(h64, W64, t, bias=b64, temperature=temperature, ref_hidden=ref_h.double(),
                            ref_weight=ref_W.double(), with_entropy=True, with_kl=True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=2e-5)
    assert (out[2] > -1e-5).all()  # KL >= 0
    g = grads_of(out, up, [h, W, b])
    g_ref = grads_of(ref, up, [h64, W64, b64])
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks", [(9, 4), (1, 2)])
def test_float64_inputs_are_exact(chunks):
    h, W, b, ref_h, ref_W, t, up = make_inputs(9, 16, 12, seed=1, dtype=torch.float64)
    kw = dict(bias=b, temperature=0.8, ref_hidden=ref_h, ref_weight=ref_W, with_entropy=True, with_kl=True)
    out = lean_token_stats(h, W, t, vocab_chunk=chunks[0], token_chunk=chunks[1], **kw)
    ref = naive_token_stats(h, W, t, **kw)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads_of(out, up, [h, W, b]), grads_of(ref, up, [h, W, b])):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    h, W, b, ref_h, ref_W, t, _ = make_inputs(4, 3, 7, seed=2, dtype=torch.float64)

    def f(h, W, b):
        return lean_token_stats(h, W, t, bias=b, temperature=0.9, ref_hidden=ref_h, ref_weight=ref_W,
                                with_entropy=True, with_kl=True, vocab_chunk=3, token_chunk=3)

    assert torch.autograd.gradcheck(f, (h, W, b))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_single_output_gradients(which):
    """Backward with only one of the three outputs in the loss (the others get no grad)."""
    h, W, b, ref_h, ref_W, t, up = make_inputs(20, 12, 30, seed=10 + which)
    out = lean_token_stats(h, W, t, bias=b, ref_hidden=ref_h, ref_weight=ref_W, with_entropy=True, with_kl=True,
                           vocab_chunk=7, token_chunk=6)
    h64, W64, b64 = f64(h), f64(W), f64(b)
    ref = naive_token_stats(h64, W64, t, bias=b64, ref_hidden=ref_h.double(), ref_weight=ref_W.double(),
                            with_entropy=True, with_kl=True)
    g = torch.autograd.grad((out[which].double() * up[which]).sum(), [h, W, b])
    g_ref = torch.autograd.grad((ref[which] * up[which]).sum(), [h64, W64, b64])
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


def test_large_logits_are_stable():
    h, W, b, ref_h, ref_W, t, _ = make_inputs(16, 8, 40, seed=3, scale=200.0)
    out = lean_token_stats(h, W, t, bias=b, ref_hidden=ref_h, ref_weight=ref_W, with_entropy=True, with_kl=True,
                           vocab_chunk=6, token_chunk=5)
    ref = naive_token_stats(h.double(), W.double(), t, bias=b.double(), ref_hidden=ref_h.double(),
                            ref_weight=ref_W.double(), with_entropy=True, with_kl=True)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-3)


def test_shared_head_reference_gives_zero_kl_on_identical_states():
    """LoRA reference: ref_weight defaults to the policy head; same states -> KL = 0."""
    h, W, b, _, _, t, _ = make_inputs(10, 8, 20, seed=4)
    logp, ent, kl = lean_token_stats(h, W, t, bias=b, ref_hidden=h.detach(), with_kl=True, vocab_chunk=6)
    assert ent is None
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-6, rtol=0)


def test_without_weight_grad():
    """A frozen head (LoRA): only the hidden states get a gradient."""
    h, W, b, *_ , t, up = make_inputs(10, 8, 20, seed=5)
    W = W.detach()
    logp, _, _ = lean_token_stats(h, W, t, vocab_chunk=7, token_chunk=3)
    (g,) = torch.autograd.grad((logp.double() * up[0]).sum(), [h])
    h64 = f64(h)
    ref, _, _ = naive_token_stats(h64, W.double(), t)
    (g_ref,) = torch.autograd.grad((ref * up[0]).sum(), [h64])
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)


def test_errors():
    h, W, b, ref_h, ref_W, t, _ = make_inputs(8, 4, 10, seed=6)
    with pytest.raises(ValueError, match="targets"):
        lean_token_stats(h, W, t[:5])
    with pytest.raises(ValueError, match="out of range"):
        lean_token_stats(h, W, torch.full((8,), 10))
    with pytest.raises(ValueError, match="out of range"):
        lean_token_stats(h, W, torch.full((8,), -1))
    with pytest.raises(ValueError, match="empty"):
        lean_token_stats(h[:0], W, t[:0])
    with pytest.raises(ValueError, match="hidden size"):
        lean_token_stats(h[:, :3], W, t)
    with pytest.raises(ValueError, match="ref_hidden"):
        lean_token_stats(h, W, t, with_kl=True)
    with pytest.raises(ValueError, match="ref_hidden"):
        lean_token_stats(h, W, t, with_kl=True, ref_hidden=ref_h[:4])
    with pytest.raises(ValueError, match="temperature"):
        lean_token_stats(h, W, t, temperature=0.0)


def test_ref_logp_from_the_kl_pass():
    h, W, b, ref_h, ref_W, t, _ = make_inputs(15, 8, 33, seed=7)
    *_, ref_logp = lean_token_stats(h, W, t, bias=b, temperature=0.8, ref_hidden=ref_h, ref_weight=ref_W,
                                    with_kl=True, return_ref_logp=True, vocab_chunk=10, token_chunk=4)
    expected, _, _ = naive_token_stats(ref_h.double(), ref_W.double(), t, temperature=0.8)
    assert not ref_logp.requires_grad
    torch.testing.assert_close(ref_logp.double(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    h, W, b, ref_h, ref_W, t, up = make_inputs(24, 16, 40, seed=8)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    out = lean_token_stats(hb, Wb, t, ref_hidden=ref_h.bfloat16(), ref_weight=ref_W.bfloat16(),
                           with_entropy=True, with_kl=True, vocab_chunk=9, token_chunk=7)
    # reference: the same bf16 values, exact arithmetic
    ref = naive_token_stats(hb.detach().double(), Wb.detach().double(), t, ref_hidden=ref_h.bfloat16().double(),
                            ref_weight=ref_W.bfloat16().double(), with_entropy=True, with_kl=True)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)
    gh, gW = torch.autograd.grad(sum((o.double() * u).sum() for o, u in zip(out, up)), [hb, Wb])
    assert gh.dtype == torch.bfloat16 and gW.dtype == torch.bfloat16 and torch.isfinite(gW.float()).all()


def _largest_allocation(fn):
    """Largest CPU allocation made by any single op while running fn (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_never_materialises_tokens_by_vocabulary():
    N, H, V = 512, 32, 4096
    h, W, _, ref_h, ref_W, t, _ = make_inputs(N, H, V, seed=9, bias=False)
    kw = dict(ref_hidden=ref_h, ref_weight=ref_W, with_entropy=True, with_kl=True)

    def lean():
        out = lean_token_stats(h, W, t, vocab_chunk=1024, token_chunk=128, **kw)
        sum(o.sum() for o in out).backward()

    def naive():
        out = naive_token_stats(h, W, t, **kw)
        sum(o.sum() for o in out).backward()

    full = N * V * 4  # one float32 (N, V) tensor
    assert _largest_allocation(naive) >= full  # the measurement does see a full-logits tensor
    # lean: a tile is 128 x 1024 floats (1/16 of the full tensor); W's gradient is V x H
    assert _largest_allocation(lean) <= max(128 * 1024 * 4, V * H * 4) * 1.5 < full / 4


def test_frozen_head_cast_is_kept_until_the_weight_changes():
    """A frozen weight (a LoRA model's tied head) is cast to the matmul dtype once and the cast is
    reused, by the forward and the backward, until an in-place change bumps its version; a weight
    that trains is cast at every call; casts of freed weights leave the cache."""
    import gc

    from ratiorl.policy import lean_head as L

    h, W, _, _, _, t, _ = make_inputs(24, 16, 40, seed=9)
    frozen = torch.nn.Parameter(W.detach().clone(), requires_grad=False)
    first = L._matmul_weight(frozen, torch.bfloat16)
    assert L._matmul_weight(frozen, torch.bfloat16) is first and torch.equal(first, frozen.bfloat16())
    with torch.no_grad():
        frozen.mul_(2)
    second = L._matmul_weight(frozen, torch.bfloat16)
    assert second is not first and torch.equal(second, frozen.bfloat16())
    trains = torch.nn.Parameter(W.detach().clone())
    assert L._matmul_weight(trains, torch.bfloat16) is not L._matmul_weight(trains, torch.bfloat16)

    # the statistics and the hidden-state gradient with the kept cast equal those with a fresh one
    def stats(weight):
        hh = h.detach().clone().requires_grad_()
        out = lean_token_stats(hh, weight, t, with_entropy=True, vocab_chunk=9, token_chunk=7,
                               matmul_dtype=torch.bfloat16)
        (g,) = torch.autograd.grad(out[0].sum() + out[1].sum(), [hh])
        return out[0], out[1], g

    cached, fresh = stats(frozen), stats(torch.nn.Parameter(frozen.detach().clone()))
    for a, b in zip(cached, fresh):
        assert torch.equal(a, b)
    del frozen, first, second, cached
    gc.collect()
    alive = torch.randn(5, 3)
    L._matmul_weight(alive, torch.bfloat16)  # a new entry clears the freed ones
    assert L._FROZEN_CASTS and all(owner() is not None for owner, _, _ in L._FROZEN_CASTS.values())
