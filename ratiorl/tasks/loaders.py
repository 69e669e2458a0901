"""Load prompt/answer examples from JSONL files and (optionally) Hugging Face datasets.

Both loaders return a list of dicts with ``"prompt"`` and ``"answer"`` (strings) plus any
extra fields asked for. A prompt may also be a list of chat messages (``[{"role": "user",
"content": "..."}]``), which is kept as it is and rendered by the trainer with the tokenizer's
chat template (``ratiorl.train.prompts``). Problems with the data raise ``ValueError`` naming the file, the line
(for JSONL) and the field.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def is_messages(value: Any) -> bool:
    """True for a chat prompt: a non-empty list of ``{"role": ..., "content": ...}`` dicts."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _map_record(record: Any, where: str, prompt_field: str, answer_field: str,
                extra_field_map: dict[str, str]) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    out: dict[str, Any] = {}
    for target, source in (("prompt", prompt_field), ("answer", answer_field)):
        if source not in record:
            raise ValueError(f"{where}: missing field {source!r} (used as {target!r}); "
                             f"fields present: {', '.join(map(repr, record)) or 'none'}")
        if record[source] is None:
            raise ValueError(f"{where}: field {source!r} (used as {target!r}) is null")
        value = record[source]
        out[target] = value if target == "prompt" and is_messages(value) else _as_text(value)
    for target, source in extra_field_map.items():
        if source not in record:
            raise ValueError(f"{where}: missing field {source!r} (used as {target!r})")
        out[target] = record[source]
    return out


def load_jsonl(path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer",
               **extra_field_map: str) -> list[dict[str, Any]]:
    """Read one JSON object per line.

    ``prompt_field`` / ``answer_field`` name the source fields; non-string answers are
    converted with ``str`` (lists/dicts with ``json.dumps``). ``extra_field_map`` keeps more
    fields, e.g. ``load_jsonl(p, tests="test_list")`` puts ``record["test_list"]`` under
    ``"tests"`` (values kept as they are, so a list of tests stays a list). Blank lines are
    skipped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such JSONL file: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(_map_record(record, f"{path}, line {lineno}", prompt_field,
                                        answer_field, extra_field_map))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def _records_from_dataset(ds) -> Iterable[dict]:
    return (ds[i] for i in range(len(ds)))


def load_hf_dataset(name_or_path: str | os.PathLike, split: str = "train", prompt_field: str = "prompt",
                    answer_field: str = "answer", **extra_field_map: str) -> list[dict[str, Any]]:
    """Load a split of a Hugging Face dataset and map its fields like :func:`load_jsonl`.

    ``name_or_path`` may be a directory written by ``Dataset.save_to_disk`` /
    ``DatasetDict.save_to_disk``, a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet``
    file, or a hub name (which needs network access). Needs the ``datasets`` package
    (``pip install 'ratiorl[datasets]'``).
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_dataset needs the 'datasets' package: "
                          "pip install 'ratiorl[datasets]'") from e
    source = os.fspath(name_or_path)
    where = source
    if os.path.isdir(source) and (os.path.exists(os.path.join(source, "dataset_info.json"))
                                  or os.path.exists(os.path.join(source, "dataset_dict.json"))):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
    elif os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower().lstrip(".")
        builder = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"{source}: unsupported file type {ext!r}; use json, jsonl, csv or parquet")
        if os.path.getsize(source) == 0:
            raise ValueError(f"{source}: no examples (the file is empty)")
        try:
            ds = datasets.load_dataset(builder, data_files={split: source}, split=split)
        except Exception as e:  # datasets wraps parse errors in several exception types
            raise ValueError(f"{source}: could not read as {ext}: {e}") from e
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise ValueError(f"could not load dataset {source!r} (split {split!r}): {e}") from e
        where = f"{source}[{split}]"
    columns = list(ds.column_names)
    for target, col in [("prompt", prompt_field), ("answer", answer_field), *extra_field_map.items()]:
        if col not in columns:
            raise ValueError(f"{where}: missing field {col!r} (used as {target!r}); "
                             f"columns: {', '.join(columns)}")
    if len(ds) == 0:
        raise ValueError(f"{where}: no examples in split {split!r}")
    return [_map_record(rec, f"{where}, row {i}", prompt_field, answer_field, extra_field_map)
            for i, rec in enumerate(_records_from_dataset(ds))]
