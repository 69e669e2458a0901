"""Atomic checkpoints: a checkpoint directory is either complete or absent.

Layout: ``run_dir/checkpoints/step_000120/`` holding whatever files the trainer hands over
(``state.pt`` with optimizer, scheduler, RNG states, step and data position; ``model/`` in
Hugging Face format). Writing goes to a hidden temporary directory next to it, every file is
fsync'ed, and only then is the directory renamed into place with ``os.replace`` (atomic on POSIX),
so a crash at any moment leaves either the previous set of checkpoints or the new one. Re-saving a
step moves the old copy aside first; a crash between the two renames is repaired on the next
listing (the aside copy is moved back).

``state.pt`` holds only tensors and plain containers (RNG states included, see :func:`rng_state`)
and is read with ``torch.load(weights_only=True)`` (:func:`load_state`): a checkpoint cannot run
code. A checkpoint that fails to load falls back to the previous one (:func:`load_newest_state`).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from typing import Callable, Optional

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)$")


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_ASIDE = re.compile(r"^\.old_step_(\d+)_\d+$")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "COMPLETE"))


def _repair(ckpt_dir: str) -> None:
    """A crash between the two renames of a re-save leaves ``.old_step_N_<pid>`` complete and no
    ``step_N``: move it back so the newest checkpoint is never lost."""
    for name in os.listdir(ckpt_dir):
        m = _ASIDE.match(name)
        final = os.path.join(ckpt_dir, f"step_{int(m.group(1)):06d}") if m else None
        if m and not os.path.exists(final) and _is_complete(os.path.join(ckpt_dir, name)):
            try:
                os.replace(os.path.join(ckpt_dir, name), final)
            except OSError:
                pass


def list_checkpoints(ckpt_dir: str) -> list:
    """Complete checkpoints, oldest first, as (step, path)."""
    if not os.path.isdir(ckpt_dir):
        return []
    _repair(ckpt_dir)
    out = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, "COMPLETE")):
            out.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(ckpt_dir: str, step: int, write: Callable[[str], None], keep_last: int = 2) -> str:
    """Call ``write(tmp_dir)`` to fill a fresh directory, then move it to ``step_<step>`` atomically.

    Older checkpoints beyond ``keep_last`` are removed afterwards. Returns the final path.
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = os.path.join(ckpt_dir, f".tmp_step_{step:06d}_{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write(tmp)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(f"{step}\n")
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. Ctrl-C right after a save)
            old = os.path.join(ckpt_dir, f".old_step_{step:06d}_{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _step, path in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    # leftovers of a crash in the middle of an earlier save (an aside copy whose step exists again)
    _repair(ckpt_dir)
    for name in os.listdir(ckpt_dir):
        if name.startswith((".tmp_step_", ".old_step_")) and not name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- loading


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (corrupt, truncated, or holding pickled objects)."""

    def __init__(self, message: str, unsafe: bool = False):
        super().__init__(message)
        self.unsafe = unsafe


def load_state(path: str, map_location=None) -> dict:
    """``torch.load(<path>/state.pt, weights_only=True)``: tensors and plain containers only.

    A file holding any other pickled object raises :class:`CheckpointError` with ``unsafe=True``
    (nothing in it is executed); a missing, truncated or corrupt file raises it with
    ``unsafe=False``."""
    file = os.path.join(path, "state.pt")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        detail = [line for line in msg.splitlines() if "global" in line.lower() or "Unsupported" in line]
        if any("global" in line.lower() for line in detail):
            raise CheckpointError(
                f"{file} holds pickled Python objects, not only tensors and plain containers; it is not "
                "loaded (torch.load with weights_only=True): it was written by an older version or "
                f"altered ({detail[0].strip()})", unsafe=True) from None
        raise CheckpointError(f"{file} cannot be read: {(detail or [type(e).__name__])[0].strip()}") from e
    except Exception as e:  # truncated zip, missing file, bad magic number, ...
        raise CheckpointError(f"{file} cannot be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} is not a ratiorl trainer state")
    return state


def load_newest_state(ckpt_dir: str, map_location=None, warn=print, newest: Optional[str] = None) -> tuple:
    """``(path, state)`` of the newest checkpoint (not after ``newest`` when given) that loads; a
    checkpoint that fails to load is skipped with a warning (the previous one is tried). A checkpoint
    holding pickled objects is an error, never skipped. Raises :class:`CheckpointError` when none
    loads."""
    problems = []
    ckpts = list_checkpoints(ckpt_dir)
    if newest is not None:
        m = _NAME.match(os.path.basename(os.path.normpath(newest)))
        ckpts = [(s, p) for s, p in ckpts if m and s <= int(m.group(1))] or [(0, newest)]
    for _step, path in reversed(ckpts):
        try:
            return path, load_state(path, map_location)
        except CheckpointError as e:
            if e.unsafe:
                raise
            problems.append(str(e))
            warn(f"[yellow]checkpoint {path} failed to load ({e}); trying the previous one[/]")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} loads" + (": " + "; ".join(problems) if problems else ""))


# ----------------------------------------------------------------------------- RNG state


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    """Python's, NumPy's, torch's (CPU, CUDA) and ``generator``'s RNG states as tensors, lists,
    ints, floats and strings only (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- trainer state


def trainer_state(t) -> dict:
    """Everything a resumed ``Trainer`` needs to continue with the same numbers: trainable weights,
    optimizer and schedule, data position, sampling and reward-noise RNG streams, a lagging
    sampler's weights, the critic, the KL controller, beta and the evaluation history."""
    from .config import config_to_dict  # noqa: PLC0415
    from .fsdp import gather_full  # noqa: PLC0415

    trainable = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    update = t.update.state_dict()
    if getattr(t, "fsdp", None) is not None:  # sharded: full tensors, held by rank 0 only (it writes)
        trainable, update = gather_full(trainable, t.dist.is_main), gather_full(update, t.dist.is_main)
    return {
        "step": t.step_count,
        "trainable": trainable,
        "update": update,
        "stream": t.stream.state_dict(),
        "rng": rng_state(t.generator),
        "scorer_rng": t.scorer.rng_state(),
        "sampler": (None if t.engine is t.eval_engine else
                    {k: v.clone() for k, v in t.engine.model.state_dict().items()}),
        "sampler_sync": t.sampler.state_dict(),  # the sampler's policy version and pending lag snapshots
        "critic": t.critic.state_dict() if t.critic is not None else None,
        "pf_ppo": pf_ppo.state_dict() if (pf_ppo := getattr(t.advantages, "pf_ppo", None)) is not None else None,
        "kl_control": t.kl_control.state_dict(),
        "beta": t.objective.beta,
        "evaluation": t.evaluation.state_dict(),
        "wall_seconds": t.wall_seconds(),
        "config": config_to_dict(t.cfg),
        # data parallel: every rank's sampling / reward-noise RNG streams and data position (gathered
        # on every rank, written by rank 0; the entries above are rank 0's); None in one process
        "ranks": t.dist.gather(rank_state(t)) if t.dist.enabled else None,
    }


def rank_state(t) -> dict:
    """The part of the state that differs between data-parallel ranks."""
    return {"rng": rng_state(t.generator), "stream": t.stream.state_dict(), "scorer_rng": t.scorer.rng_state()}


def restore_trainer(t, state: dict, path: str) -> None:
    """The inverse of ``trainer_state`` on a freshly built trainer of the same config."""
    named = dict(t.model.named_parameters())
    missing = [n for n in state["trainable"] if n not in named]
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model (e.g. {missing[0]}); "
                         "resume with the config the run was started with")
    from .fsdp import shard_like  # noqa: PLC0415

    with torch.no_grad():
        for n, v in state["trainable"].items():
            named[n].copy_(shard_like(v, named[n]))  # fsdp: this rank's shard of the full tensor
    t.update.load_state_dict(state["update"])
    own = state
    if state.get("ranks") is not None or t.dist.enabled:  # each rank continues its own streams
        saved = len(state.get("ranks") or [None])
        if saved != t.dist.world_size:
            raise ValueError(f"checkpoint {path} was written by {saved} data-parallel rank(s); resume it with the "
                             f"same number (torchrun --nproc-per-node {saved}), not {t.dist.world_size}")
        own = state["ranks"][t.dist.rank]
    t.stream.load_state_dict(own["stream"])
    set_rng_state(own["rng"], t.generator)
    t.scorer.set_rng_state(own["scorer_rng"])
    if t.engine is not t.eval_engine:
        if state["sampler"] is not None:
            t.engine.model.load_state_dict(state["sampler"])
        else:
            t.engine.load_weights(t.model)
    if "sampler_sync" in state:
        t.sampler.load_state_dict(state["sampler_sync"])
    if t.critic is not None:
        t.critic.load_state_dict(state["critic"])
    if getattr(t.advantages, "pf_ppo", None) is not None and state.get("pf_ppo") is not None:
        t.advantages.pf_ppo.load_state_dict(state["pf_ppo"])  # PF-PPO's resampling stream
    t.kl_control.load_state_dict(state["kl_control"])
    t.set_objective(t.objective.replace(beta=float(state["beta"])))
    t.evaluation.load_state_dict(state["evaluation"])
    t.step_count, t.wall_before = state["step"], state["wall_seconds"]
