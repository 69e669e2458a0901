"""The native decode-attention kernel (``ratiorl.rollout.native``) against a float64 computation of
softmax(scale q K^T + mask) V, over one or two cache parts in any row/head strides, grouped query
heads, head sizes of one vector register's multiples and others; its errors; its build cache; and how the
engine falls back when it cannot be built. The decoder's samples with it are checked in
test_lean_decoder.py."""

import os

import pytest
import torch

from ratiorl.policy import make_tiny_model
from ratiorl.rollout import HFRolloutEngine, native


@pytest.fixture(scope="module")
def kernel():
    try:
        return native.decode_attention()
    except native.NativeUnavailable as e:
        pytest.skip(f"native decode attention unavailable: {e}")


def float64_attention(q, parts, mask, scale):
    """Each row and query head by itself, in float64 (query head h reads key/value head h // G)."""
    R, KV, G, D = q.shape
    K = torch.cat([k for k, _ in parts], 2).double()
    V = torch.cat([v for _, v in parts], 2).double()
    out = torch.empty(R, KV, G, D, dtype=torch.float64)
    for r in range(R):
        for h in range(KV):
            for g in range(G):
                s = K[r, h] @ q[r, h, g].double() * scale + mask[r, :K.shape[2]].double()
                out[r, h, g] = torch.softmax(s, 0) @ V[r, h]
    return out


def cache_part(R, KV, n, D, gen, spare=0):
    """Keys and values of n columns: slices of a cache block with ``spare`` more columns (strided rows
    and heads, as the decoder's preallocated block)."""
    K = torch.randn(R, KV, n + spare, D, generator=gen)
    V = torch.randn(R, KV, n + spare, D, generator=gen)
    return K[:, :, :n], V[:, :, :n]


@pytest.mark.parametrize("R, KV, G, D, n1, n2", [
    (3, 2, 1, 64, 9, 0),      # one part, GPT-2's head size
    (2, 1, 3, 64, 7, 5),      # grouped query heads (3 per key/value head), two parts
    (2, 2, 2, 128, 1, 6),     # Qwen2's head size
    (4, 3, 1, 8, 13, 2),      # a head size under one vector
    (1, 1, 2, 80, 0, 11),     # not a multiple of 16; an empty first part
    (2, 1, 1, 256, 4, 4),     # a large head
    (1, 1, 1, 300, 3, 1),
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64(kernel, R, KV, G, D, n1, n2, cache_dtype):
    """bfloat16 keys and values: the float64 computation over the same (widened) values."""
    gen = torch.Generator().manual_seed(R * 1000 + D + n1)
    q = torch.randn(R, KV, G, D, generator=gen) * 2
    parts = [cache_part(R, KV, n1, D, gen, spare=3), cache_part(R, KV, n2, D, gen, spare=1)]
    if cache_dtype != torch.float32:
        parts = [(k.to(cache_dtype), v.to(cache_dtype)) for k, v in parts]
    mask = torch.zeros(R, n1 + n2 + 5)
    mask[0, 0] = float("-inf")  # a padding column (the row keeps others)
    if R > 1 and n1 + n2 > 2:
        mask[1, 1:3] = float("-inf")
    scale = D ** -0.5
    got = kernel(q, parts, mask, scale)
    want = float64_attention(q, parts, mask, scale)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the torch computation the lean decoder's other path does, to the same tolerance
    widened = [(k.float(), v.float()) for k, v in parts]
    torch.testing.assert_close(native.reference_attention(q, widened, mask, scale).double(), want, rtol=1e-5, atol=1e-5)


def test_one_part_equals_the_same_columns_split_in_two(kernel):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 1, 64, generator=gen)
    K, V = cache_part(2, 2, 20, 64, gen)
    mask = torch.zeros(2, 20)
    whole = kernel(q, [(K, V)], mask, 0.125)
    split = kernel(q, [(K[:, :, :11], V[:, :, :11]), (K[:, :, 11:].contiguous(), V[:, :, 11:].contiguous())], mask, 0.125)
    torch.testing.assert_close(whole, split, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named(kernel):
    q = torch.randn(2, 1, 1, 64)
    K, V = torch.randn(2, 1, 5, 64), torch.randn(2, 1, 5, 64)
    mask = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernel(q, [(K.double(), V.double())], mask, 1.0)
    with pytest.raises(ValueError, match="all parts alike"):
        kernel(q, [(K, V), (K.bfloat16(), V.bfloat16())], mask, 1.0)
    with pytest.raises(ValueError, match="rows of D contiguous"):
        kernel(q, [(K.transpose(2, 3), V)], mask, 1.0)
    with pytest.raises(ValueError, match="do not match q"):
        kernel(q, [(torch.randn(2, 1, 5, 32), torch.randn(2, 1, 5, 32))], mask, 1.0)
    with pytest.raises(ValueError, match=">= 5"):
        kernel(q, [(K, V)], torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="one or two cache parts"):
        kernel(q, [(K, V)] * 3, mask, 1.0)


def test_a_build_is_kept_and_reused(tmp_path):
    cc = native.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    lib = native.build(cc, tmp_path)
    stamp = lib.stat().st_mtime_ns
    assert native.build(cc, tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary file left behind
    lib.chmod(0o777)  # a library others could have replaced is not loaded
    with pytest.raises(native.NativeUnavailable, match="writable by others"):
        native.build(cc, tmp_path)


def test_unavailable_kernel_falls_back_or_errors_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("RATIORL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-for-ratiorl")
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.decode_attention()
    model, tok = make_tiny_model(n_embd=32, n_head=4, n_layer=1, seed=0)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        dec = HFRolloutEngine(model, tok, attention="auto").lean_decoder()
    assert dec is not None and dec.attention is None  # torch's matmuls
    with pytest.raises(RuntimeError, match="attention='native': no C compiler"):
        HFRolloutEngine(model, tok, attention="native").lean_decoder()
    assert HFRolloutEngine(model, tok, attention="torch").lean_decoder().attention is None
    with pytest.raises(ValueError, match="attention must be one of"):
        HFRolloutEngine(model, tok, attention="flash")
    if os.path.exists("/bin/false"):  # a compiler that fails: the build's error is reported
        monkeypatch.setenv("CC", "/bin/false")
        with pytest.raises(native.NativeUnavailable, match="failed"):
            native.decode_attention()
