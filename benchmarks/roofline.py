"""Roofline for an RL step: the model's matmul FLOPs against the measured matmul rate of this machine.

Used by ``vs_trl.py`` and ``scaling.py``; importable on its own (``sys.path`` has this folder when a
script here runs).

What is counted. Nearly all of a transformer's arithmetic at short and moderate context lengths is
the matmuls with its weight matrices: every ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's
projections), the output head (``model.get_output_embeddings()``; counted even when its weight is
tied to the input embedding, because the forward still multiplies by it), and LoRA's ``A`` and
``B`` (PEFT's adapters are ``nn.Linear`` modules next to the frozen ``base_layer``). One token
through one weight matrix of ``k x n`` elements is ``k * n`` multiply-adds, i.e. ``2 k n`` FLOPs, so

    matmul_flops_per_token(model) = 2 x sum over those matmuls of weight.numel()

Not counted: attention's score and value products (``2 x 2 x n_layer x context x d_model`` per token:
they grow with the context, and are small next to the weights' FLOPs for the models and lengths
used here), norms, activations, softmax, the embedding lookup. The count is the work that a run
needs (the "model FLOPs" of MFU), not what a library happens to compute: padding is not work, and
neither is recomputing a prompt once per completion.

Per RL step (``FlopCounts``; ``body`` = every matmul but the head, ``head`` = the output head):

    sampling = body x (sampled completion tokens + prompt tokens, each distinct prompt once)
             + head x sampled completion tokens          (logits are needed only where a token is drawn)
    training = per optimizer pass (forward + backward), over the real tokens trained (no padding, each
               distinct prompt once):
               (2 x body + body_trainable) x (prompt tokens, each distinct prompt once, + completion tokens)
             + (2 x head + head_trainable) x completion tokens

The forward is 1 x the weights' FLOPs; the backward is another 1 x for the gradient with respect to
the activations and 1 x more for the gradient of each *trained* weight. With every weight trained
that is the usual 3 x forward ("6 N per token"); with LoRA the frozen base weights need no weight
gradient, so the factor is about 2 x (the count still includes the input-gradient matmuls of the
first layer, which autograd skips when nothing below it trains: a small overcount). The head's
logits are needed only on completion tokens (both TRL and ratiorl compute them only there).

The limit. ``measured_matmul_rate(model, rows, dtype)`` runs exactly the model's own matmuls, each
weight cast to ``dtype`` and multiplied by a ``rows x in_features`` activation, back to back
through all layers, several times, with torch's plain matmuls and, for the sampling shape, also
through oneDNN's prepacked weights (faster for few rows, and what ratiorl's decoder uses), and
returns the faster kernel's best GFLOP/s over the passes: what this machine does with that
arithmetic at that shape, measured in the same process and with the same thread count as the run.
The sampling shape is one decode step (``rows`` = prompts x G); the training shape is the tokens of
one micro-batch (capped). ``fraction = achieved model FLOP rate / measured rate``: 1.0 would mean
the step does nothing but the model's matmuls at the machine's speed; what is missing is overhead
(Python, small kernels, memory traffic, attention, sampling bookkeeping) or work a library does
that is not needed (padding, recomputed prompts).
"""

from __future__ import annotations

import dataclasses
import time
import typing

import torch
from torch import nn

# one matmul's output is computed in row chunks of at most this many elements, so that measuring
# a large head at the training shape does not allocate gigabytes (the FLOPs are the same)
MAX_OUTPUT_ELEMENTS = 1 << 24


def is_matmul_module(module: nn.Module) -> bool:
    """``nn.Linear`` (weight ``out x in``) or transformers' ``Conv1D`` (weight ``in x out``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def output_head(model: nn.Module):
    """The output embedding module (``lm_head``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


class Matmul(typing.NamedTuple):
    name: str
    weight: torch.Tensor
    in_features: int
    is_head: bool  # the output embedding
    conv1d: bool  # weight stored in x out (GPT-2's Conv1D) rather than out x in


def matmul_weights(model: nn.Module) -> list:
    """A ``Matmul`` for every weight matmul of the forward, one per module (a tied head is listed
    although its weight is the input embedding's)."""
    head = output_head(model)
    out, seen = [], set()
    for name, module in model.named_modules():
        if not is_matmul_module(module) or id(module) in seen:
            continue
        seen.add(id(module))
        w, conv = module.weight, type(module).__name__ == "Conv1D"
        out.append(Matmul(name, w, int(w.shape[0] if conv else w.shape[1]), module is head, conv))
    if head is not None and id(head) not in seen and getattr(head, "weight", None) is not None:
        out.append(Matmul("<output head>", head.weight, int(head.weight.shape[1]), True, False))
    return out


def matmul_flops_per_token(model: nn.Module) -> int:
    """2 x (weight elements of every matmul one token goes through in the forward), head included."""
    return 2 * sum(m.weight.numel() for m in matmul_weights(model))


@dataclasses.dataclass
class FlopCounts:
    """Forward matmul FLOPs per token, split into the output head and the rest ("body"), and the
    part of each whose weights get a gradient (``*_trainable``)."""

    body: int
    head: int
    body_trainable: int
    head_trainable: int

    @classmethod
    def of(cls, model: nn.Module) -> FlopCounts:
        c = {"body": 0, "head": 0, "body_trainable": 0, "head_trainable": 0}
        for m in matmul_weights(model):
            part = "head" if m.is_head else "body"
            c[part] += 2 * m.weight.numel()
            if m.weight.requires_grad:
                c[part + "_trainable"] += 2 * m.weight.numel()
        return cls(**c)

    @property
    def per_token(self) -> int:
        return self.body + self.head

    @property
    def training_factor(self) -> float:
        """Training FLOPs of a token (body) over its forward FLOPs: 3.0 when every weight trains."""
        return (2 * self.body + self.body_trainable) / max(self.body, 1)

    def sampling_flops(self, sampled_tokens: float, prefill_tokens: float) -> float:
        """Sampling: every sampled token and every distinct prompt token once through the body,
        the head once per sampled token."""
        return self.body * (sampled_tokens + prefill_tokens) + self.head * sampled_tokens

    def training_flops(self, tokens: float, completion_tokens: float) -> float:
        """One forward + backward over ``tokens`` real tokens (prompt + completion), the head on
        the ``completion_tokens`` only."""
        return ((2 * self.body + self.body_trainable) * tokens
                + (2 * self.head + self.head_trainable) * completion_tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_threads(threads):
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    return old


def measured_matmul_rate(model: nn.Module, rows: int, dtype=torch.float32, threads: int | None = None,
                         repeats: int = 10, warmup: int = 1, prepacked: bool = True) -> float:
    """GFLOP/s of the model's own matmuls at ``rows`` activation rows in ``dtype`` (the fastest of
    ``repeats`` passes through all of them, after ``warmup`` untimed passes: a limit is what the
    machine can do, and on a shared machine a median of a few passes reads low whenever a neighbour
    is busy; measured in one run here, the median of 3 put the fp32 decode limit at 96 GFLOP/s where
    other runs measured 166). With ``prepacked``
    the same matmuls are also timed through oneDNN's prepacked weights (what ratiorl's decoder
    uses: ``ratiorl.rollout.decoder.prepack``), and the faster of the two kernels is the limit."""
    rows = max(1, int(rows))
    mats = [(m.weight.detach().to(dtype), m.in_features, m.conv1d) for m in matmul_weights(model)]
    if not mats:
        raise ValueError(f"{type(model).__name__} has no matmul weights")
    device = mats[0][0].device
    gen = torch.Generator(device="cpu").manual_seed(0)
    acts = {k: torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype) for k in {k for _w, k, _c in mats}}
    flops = 2 * rows * sum(w.numel() for w, _k, _c in mats)
    kernels = [lambda: [_matmul(acts[k], w, conv) for w, k, conv in mats]]
    if prepacked:
        packed = _prepacked(mats, rows)
        if packed is not None:
            kernels.append(lambda: [torch.ops.mkldnn._linear_pointwise(acts[k], p, None, "none", [], "")
                                    for p, k in packed])
    old = _set_threads(threads)
    best = 0.0
    try:
        with torch.inference_mode():
            for kernel in kernels:
                times = []
                for i in range(warmup + max(1, repeats)):
                    t0 = time.perf_counter()
                    kernel()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                best = max(best, flops / min(times) / 1e9)
    finally:
        torch.set_num_threads(old)
    return best


def _prepacked(mats, rows):
    """[(oneDNN prepacked (out, in) weight, in_features)], or None where prepacking is unavailable."""
    try:
        from ratiorl.rollout.decoder import prepack
    except ImportError:
        return None
    out = []
    for w, k, conv in mats:
        p = prepack(w.t() if conv else w, rows)
        if p is None:
            return None
        out.append((p, k))
    return out


def _matmul(x, w, conv1d: bool):
    """``x @ w`` (Conv1D, ``w`` is in x out) or ``x @ w.T`` (Linear), in row chunks that keep each
    output below ``MAX_OUTPUT_ELEMENTS``."""
    out_features = w.shape[1] if conv1d else w.shape[0]
    step = max(1, MAX_OUTPUT_ELEMENTS // max(out_features, 1))
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        if conv1d:
            torch.mm(xs, w)
        else:
            torch.nn.functional.linear(xs, w)


def fraction(flops: float, seconds: float, rate_gflops: float) -> float:
    """Achieved FLOP rate (``flops / seconds``) over the measured rate; nan when undefined."""
    if not seconds or seconds <= 0 or not rate_gflops or rate_gflops <= 0:
        return float("nan")
    return flops / seconds / 1e9 / rate_gflops


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure_rates(model: nn.Module, shapes: dict, dtypes=("float32", "bfloat16"), threads=None,
                  repeats: int = 10) -> dict:
    """``{(shape_name, dtype_name): GFLOP/s}`` for ``shapes = {name: rows}``; a dtype the machine
    cannot run gives nan. Prepacked weights count only for the ``sampling`` shape: a decode step
    reuses each weight for every token of the call, so one reorder pays for many matmuls; a training
    pass uses each weight once (and its backward needs the plain layout)."""
    rates = {}
    for shape, rows in shapes.items():
        for dt in dtypes:
            try:
                rates[(shape, dt)] = measured_matmul_rate(model, rows, DTYPES[dt], threads, repeats,
                                                          prepacked=shape == "sampling")
            except (RuntimeError, TypeError) as e:  # e.g. a dtype without a CPU kernel
                print(f"  (matmul rate {shape} {dt}: {e})")
                rates[(shape, dt)] = float("nan")
    return rates


__all__ = [
    "DTYPES",
    "FlopCounts",
    "Matmul",
    "fraction",
    "is_matmul_module",
    "matmul_flops_per_token",
    "matmul_weights",
    "measure_rates",
    "measured_matmul_rate",
    "output_head",
]
