"""A native decode-attention kernel, built on first use with the machine's C compiler.

Why. A decode step's attention reads every row's whole KV cache to do a few FLOPs per byte. In
torch it is two batched matmuls of one query row per head with a softmax between (three passes,
hundreds of tiny matmuls, each with its fixed cost); measured at the realistic benchmark shape
(64 rows x 6 heads x 6 layers x 64 steps, 2 threads) it took about 250 ms of a 930 ms ``generate``
call. ``decode_attention.c`` (next to this file) does one pass per query head over its keys and
values (scores, softmax, weighted sum) on torch's own OpenMP threads. No well-kept library
offers this for CPU PyTorch: ``scaled_dot_product_attention``'s CPU kernel is slower than the matmuls for one
query, and ``torch.compile`` of the same function was no faster (docs/performance.md).

The kernel computes, for each row r and query head h (key/value head h // G):

    o_rh = softmax(scale * q_rh K_r^T + mask_r) V_r       over the cache columns given

in float32 arithmetic, as the torch path does (only the order of the additions differs), over a
float32 cache or a bf16 one (a bf16 sampler's keys and values, widened exactly as they are read:
half the bytes of a float32 cache holding the same values).

Build: ``cc -O3 -march=native -fopenmp -shared -fPIC`` (``$CC``, else ``gcc``, else ``cc``) into
``$RATIORL_CACHE_DIR/kernels`` (default ``$XDG_CACHE_HOME/ratiorl`` or ``~/.cache/ratiorl``) under
a name that hashes the source, the flags, the compiler's version and this CPU's model and flags,
so a cache shared between machines never loads a build for another CPU; written to a temporary
file and renamed, so a crash never leaves half a library. A build is loaded only when the process
has one OpenMP runtime afterwards (torch's libgomp: a second runtime would fight it for the cores),
and only after it matched the torch computation on a small case. ``decode_attention()`` returns
the kernel, or raises ``NativeUnavailable`` saying why (no compiler, the build failed, another
OpenMP runtime, not Linux, ...): the lean decoder then keeps the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be used here; the message says why."""


def cache_dir() -> Path:
    """Where built kernels are kept: ``$RATIORL_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/ratiorl/kernels``,
    else ``~/.cache/ratiorl/kernels``."""
    root = os.environ.get("RATIORL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ratiorl")
    return Path(root) / "kernels"


def compiler() -> str | None:
    """The C compiler builds use: ``$CC``, else ``gcc``, else ``cc`` on the PATH (None: none)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("cc")


def _cpu_identity() -> str:
    """This CPU's model and feature flags (-march=native builds for exactly these)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux)."""
    with open("/proc/self/maps") as f:
        return {ln.split()[-1] for ln in f if any(name in ln for name in ("libgomp", "libiomp", "libomp"))}


def _unsupported_platform() -> str | None:
    if platform.system() != "Linux":
        return f"the native kernel is built and checked on Linux only (this is {platform.system()})"
    if not torch.backends.openmp.is_available():
        return "torch was built without OpenMP (the kernel runs on torch's OpenMP threads)"
    runtimes = _openmp_runtimes()
    if not any("libgomp" in p for p in runtimes):
        return f"torch's OpenMP runtime is not GNU libgomp (mapped: {sorted(runtimes) or 'none'})"
    return None


def build(cc: str, out_dir: Path) -> Path:
    """Compile the kernel with ``cc`` into ``out_dir`` (or find it there); returns the library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_identity(),
                                    platform.machine()]).encode()).hexdigest()[:20]
    lib = out_dir / f"decode_attention-{key}.so"
    if lib.exists():
        st = lib.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:  # code this process would run: only its user's
            raise NativeUnavailable(f"{lib} is not owned by this user or is writable by others; not loaded "
                                    f"(delete it, or set RATIORL_CACHE_DIR to a directory of your own)")
        return lib
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise NativeUnavailable(f"building {SOURCE.name} with {cc} failed: {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # whatever the umask: the check above must accept it next time
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class DecodeAttention:
    """The loaded kernel: ``attention(q, parts, mask, scale)`` (see ``__call__``)."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self._fns = {}  # the cache's dtype -> its entry point
        for dtype, name in ((torch.float32, "ratiorl_decode_attention"),
                            (torch.bfloat16, "ratiorl_decode_attention_bf16")):
            fn = getattr(lib, name)
            fn.argtypes = [ptr, ptr, ptr, long_, long_, int_, ptr, ptr, long_, long_, int_, ptr, long_, ptr,
                           int_, int_, int_, int_, ctypes.c_float]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn

    def __call__(self, q: torch.Tensor, parts, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(scale * q K^T + mask) V over the columns of ``parts``, in order.

        q: (R, KV, G, D) float32; ``parts``: one or two (K, V) pairs, each (R, KV, n, D) with
        contiguous rows of D (any row and head strides: slices of a larger cache are fine), all
        float32 or all bfloat16 (widened to float32 as they are read); mask: (R, >= n total)
        float32 with unit column stride. Returns (R, KV, G, D) float32.
        """
        R, KV, _, D = q.shape
        parts = list(parts)
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"native decode attention takes one or two cache parts, got {len(parts)}")
        q = q.contiguous()
        args = []
        cache_dtype = parts[0][0].dtype
        for K, V in parts + [parts[0]] * (2 - len(parts)):
            for name, t in (("keys", K), ("values", V)):
                if t.dtype not in self._fns or t.dtype != cache_dtype or t.device.type != "cpu":
                    raise ValueError(f"native decode attention: {name} must be float32 or bfloat16 (all parts "
                                     f"alike) on the CPU, got {t.dtype} on {t.device} (first part: {cache_dtype})")
                if t.shape[0] != R or t.shape[1] != KV or t.shape[3] != D or t.stride(3) != 1 or t.stride(2) != D:
                    raise ValueError(f"native decode attention: {name} of shape {tuple(t.shape)}, strides "
                                     f"{t.stride()} do not match q {tuple(q.shape)} (need rows of D contiguous)")
            if K.stride() != V.stride() or K.shape != V.shape:
                raise ValueError("native decode attention: keys and values of a part must have the same layout")
            args.append((K, V))
        n = [K.shape[2] for K, _ in args[:len(parts)]] + [0] * (2 - len(parts))
        if q.dtype != torch.float32 or mask.dtype != torch.float32 or mask.stride(1) != 1 or mask.shape[0] != R \
                or mask.shape[1] < sum(n):
            raise ValueError(f"native decode attention: q ({q.dtype}) and mask ({mask.dtype}, shape "
                             f"{tuple(mask.shape)}) must be float32, the mask (R, >= {sum(n)}) with unit column stride")
        (K1, V1), (K2, V2) = args
        return self.unchecked(q, K1, V1, n[0], K2, V2, n[1], mask, scale)

    def unchecked(self, q, K1, V1, n1, K2, V2, n2, mask, scale) -> torch.Tensor:
        """``__call__`` without its checks, for a caller that checked the layout once (the lean
        decoder, at every decode step): q contiguous, parts and mask as ``__call__`` requires, the
        first ``n1`` columns of part 1 then the first ``n2`` of part 2."""
        out = torch.empty_like(q)
        rc = self._fns[K1.dtype](q.data_ptr(), K1.data_ptr(), V1.data_ptr(), K1.stride(0), K1.stride(1), n1,
                      K2.data_ptr(), V2.data_ptr(), K2.stride(0), K2.stride(1), n2,
                      mask.data_ptr(), mask.stride(0), out.data_ptr(), *q.shape, float(scale))
        if rc != 0:
            raise MemoryError(f"native decode attention: no memory for its scores (code {rc})")
        return out


def reference_attention(q, parts, mask, scale):
    """The same function in torch (the self-check's reference and the tests')."""
    K = torch.cat([k for k, _ in parts], dim=2)
    V = torch.cat([v for _, v in parts], dim=2)
    n = K.shape[2]
    scores = torch.matmul(q, K.transpose(-1, -2)) * scale + mask[:, None, None, :n]
    return torch.matmul(torch.softmax(scores, dim=-1), V)


def _self_check(kernel: DecodeAttention) -> None:
    g = torch.Generator().manual_seed(0)
    R, KV, G, D, n1, n2 = 3, 2, 2, 64, 5, 3
    q = torch.randn(R, KV, G, D, generator=g)
    big = torch.randn(R, KV, n1 + 4, D, generator=g), torch.randn(R, KV, n1 + 4, D, generator=g)
    parts = [(big[0][:, :, :n1], big[1][:, :, :n1]),
             (torch.randn(R, KV, n2, D, generator=g), torch.randn(R, KV, n2, D, generator=g))]
    mask = torch.zeros(R, n1 + n2 + 2)
    mask[0, 1] = float("-inf")
    for dtype in (torch.float32, torch.bfloat16):
        typed = [(k.to(dtype), v.to(dtype)) for k, v in parts]
        got = kernel(q, typed, mask, 0.125)
        want = reference_attention(q, [(k.float(), v.float()) for k, v in typed], mask, 0.125)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise NativeUnavailable(f"the built kernel {kernel.path} does not match torch for {dtype} keys and "
                                    f"values (max difference {(got - want).abs().max().item():.3g}); not used")


@functools.cache
def _load(cc: str | None, out_dir: str) -> DecodeAttention | NativeUnavailable:
    reason = _unsupported_platform()
    if reason is not None:
        return NativeUnavailable(reason)
    if cc is None:
        return NativeUnavailable("no C compiler found ($CC, gcc or cc on the PATH) to build the native kernel")
    try:
        path = build(cc, Path(out_dir))
        before = _openmp_runtimes()
        kernel = DecodeAttention(path)
        after = _openmp_runtimes()
        if len(after) > len(before):
            return NativeUnavailable(f"the built kernel loaded a second OpenMP runtime ({sorted(after - before)}) "
                                     f"next to torch's ({sorted(before)}); not used")
        _self_check(kernel)
        return kernel
    except NativeUnavailable as e:
        return e
    except (OSError, subprocess.SubprocessError) as e:
        return NativeUnavailable(f"building or loading the native kernel failed: {e}")


def decode_attention() -> DecodeAttention:
    """The native decode-attention kernel (built once per machine and compiler, then loaded once per
    process), or ``NativeUnavailable`` raised with the reason."""
    result = _load(compiler(), str(cache_dir()))
    if isinstance(result, NativeUnavailable):
        raise result
    return result


__all__ = ["DecodeAttention", "NativeUnavailable", "build", "cache_dir", "compiler", "decode_attention",
           "reference_attention"]
