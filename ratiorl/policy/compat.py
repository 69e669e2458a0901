"""One place for the transformers API that changed under us: the KV cache argument.

transformers 5.x renamed a causal LM's ``past_key_values=`` argument and output field to
``cache`` (the old name warns, and goes away in a later release); 4.x only knows
``past_key_values``. ``cache_kwarg(model)`` names the argument the installed version's model
takes, ``output_cache(out)`` reads the cache back from its output, under either name.
``cache_row_selector(cache)`` keeps only some batch rows of a dynamic KV cache (the sampler
drops finished rows), or says that this cache cannot.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(forward_cls) -> bool:
    try:
        return "cache" in inspect.signature(forward_cls.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kwarg(model) -> str:
    """``"cache"`` when the model's forward takes it, else ``"past_key_values"``."""
    target = model
    get_base = getattr(model, "get_base_model", None)  # PEFT wrappers forward **kwargs
    if callable(get_base):
        target = get_base()
    return "cache" if _forward_takes_cache(type(target)) else "past_key_values"


def output_cache(out):
    """The KV cache of a model output (``out.cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_row_selector(cache):
    """A function ``keep(rows)`` that keeps only batch rows ``rows`` (a LongTensor) of ``cache`` in
    place, or None when the cache cannot shrink: only dynamic caches (each layer's tensors grow
    with the sequence; transformers' ``DynamicCache``, with any ``DynamicLayer`` kind in 5.x)
    qualify, through their own ``reorder_cache`` (beam search's row selection)."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return None
    if not isinstance(cache, DynamicCache) or not hasattr(cache, "reorder_cache"):
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 5: every layer must be a dynamic one
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # pragma: no cover
            return None
        if not all(isinstance(layer, DynamicLayer) for layer in layers):
            return None
    return cache.reorder_cache


__all__ = ["cache_kwarg", "cache_row_selector", "output_cache"]
