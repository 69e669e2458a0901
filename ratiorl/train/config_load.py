"""Loading a run configuration: YAML and dotted command-line overrides into the schema dataclasses.

The schema (:mod:`ratiorl.train.config_schema`) is an OmegaConf structured config: every value
is assigned to its typed node, which converts it (``"3e-4"`` -> 3e-4, ``"true"`` -> True) or
rejects it, and the result is turned back into the dataclasses with ``OmegaConf.to_object``.
This module resolves the dotted keys first, so that an unknown key names the valid keys of its
section and the closest one, and routes the flat objective hyperparameters
(``objective.beta``) into ``objective.overrides``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_schema import ObjectiveConfig, TrainConfig

_NULLS = ("null", "~")  # YAML nulls only: "none" is a registered name (advantage, shaping, ...)


def parse_value(text: Any) -> Any:
    """A command-line value for a place without a declared type, read as a YAML scalar:
    ``"0.1"`` -> 0.1, ``"true"`` -> True, ``"[a, b]"`` -> ["a", "b"], ``"{a: 1}"`` -> {"a": 1};
    text that is not valid YAML stays a string. Non-strings are returned unchanged."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: Iterable[str]) -> list:
    """['--a.b', '1', '--c=2', 'd.e=3', '--flag'] -> [('a.b', '1'), ('c', '2'), ('d.e', '3'), ('flag', 'true')].

    A ``--key`` followed by another ``--key`` (or by nothing) is a bare flag meaning true.
    Dashes in keys become underscores (``--eval.num-prompts`` = ``--eval.num_prompts``).
    """
    args = list(args)
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            k, v = key.split("=", 1)
            pairs.append((k, v))
            i += 1
        elif arg.startswith("--"):
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                pairs.append((key, "true"))
                i += 1
            else:
                pairs.append((key, args[i + 1]))
                i += 2
        else:
            raise ValueError(f"cannot parse override {arg!r}; use --section.key value or section.key=value")
    return [(k.replace("-", "_"), v) for k, v in pairs]


# ----------------------------------------------------------------------------- schema introspection


@functools.lru_cache(maxsize=None)
def _fields(cls) -> dict:
    """Field name -> resolved annotation of a schema dataclass."""
    return typing.get_type_hints(cls)


def _unwrap(tp) -> tuple:
    """(inner type, optional): Optional[X] -> (X, True), list[str] -> (list, False)."""
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        tp = origin
    return tp, optional


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def unknown_key_error(where: str, section: str, key: str, valid: Iterable[str], rest: tuple = ()) -> ValueError:
    """``unknown config key 'train.stesp'; did you mean 'train.steps'? valid keys under 'train': ...``"""
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {_join(section, near[0], *rest)!r}?" if near else ";"
    scope = f"under {section!r}" if section else "at the top level"
    return ValueError(f"unknown config key {where!r}{hint} valid keys {scope}: {', '.join(valid)}")


_EXPECTED = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
             list: "a list", dict: "a mapping"}


# ----------------------------------------------------------------------------- building


class ConfigBuilder:
    """Assign dotted keys one at a time onto the structured defaults, then build the dataclasses.

        b = ConfigBuilder()
        b.set("train.steps", "50", from_cli=True)
        b.update({"objective": {"name": "snib", "beta": 0.1}})
        cfg = b.build()      # TrainConfig
    """

    def __init__(self):
        self.conf = OmegaConf.structured(TrainConfig)

    def update(self, data: dict, from_cli: bool = False) -> None:
        """Apply a nested mapping (a YAML document); a value for a dict field replaces it whole."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping at the top level, got {type(data).__name__}")
        for key, value in data.items():
            self.set(str(key), value, from_cli)

    def set(self, dotted: str, value: Any, from_cli: bool = False) -> None:
        """Set one dotted key. ``from_cli``: ``value`` is command-line text (parsed per the field)."""
        parts = dotted.split(".")
        cls = TrainConfig
        for i, key in enumerate(parts):
            section, where, rest = _join(*parts[:i]), _join(*parts[: i + 1]), tuple(parts[i + 1:])
            fields = _fields(cls)
            if key not in fields:
                if cls is ObjectiveConfig and not rest:
                    # a flat objective hyperparameter: objective.beta -> objective.overrides["beta"]
                    self._set_inside(_join(section, "overrides"), (key,), value, from_cli)
                    return
                raise unknown_key_error(_join(section, key, *rest), section, key, fields, rest)
            tp = fields[key]
            if dataclasses.is_dataclass(tp):
                if not rest:
                    if not isinstance(value, dict):
                        raise ValueError(f"{where}: is a section, expected a mapping, got {value!r}")
                    for sub_key, sub_value in value.items():
                        self.set(f"{where}.{sub_key}", sub_value, from_cli)
                    return
                cls = tp
                continue
            if rest:
                if _unwrap(tp)[0] is dict:  # --task.options.n_train 64: one key inside a dict field
                    self._set_inside(where, rest, value, from_cli)
                    return
                raise ValueError(f"config key {where!r} is a value, not a section (in {dotted!r})")
            self._assign(where, tp, value, from_cli)
            return

    def build(self) -> TrainConfig:
        try:
            return OmegaConf.to_object(self.conf)
        except OmegaConfBaseException as e:  # e.g. a bad ${interpolation}
            raise ValueError(f"invalid config: {_first_line(e)}") from None

    # -- internals

    def _set_inside(self, field_key: str, subkeys: tuple, value: Any, from_cli: bool) -> None:
        if from_cli:
            value = parse_value(value)
        node = OmegaConf.select(self.conf, field_key)
        for k in subkeys[:-1]:
            if k not in node or not OmegaConf.is_dict(node[k]):
                node[k] = {}
            node = node[k]
        try:
            node[subkeys[-1]] = value
        except OmegaConfBaseException as e:
            raise ValueError(f"{_join(field_key, *subkeys)}: {_first_line(e)}") from None

    def _assign(self, where: str, tp: Any, value: Any, from_cli: bool) -> None:
        inner, optional = _unwrap(tp)
        if isinstance(value, str) and optional and value.strip().lower() in _NULLS:
            value = None
        if value is None:
            if not optional:
                raise ValueError(f"{where}: expected {_EXPECTED.get(inner, 'a value')}, got None")
        elif inner is dict:
            if isinstance(value, str):
                value = parse_value(value)
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a mapping, got {value!r}")
        elif inner is list:
            if isinstance(value, str):
                value = (parse_value(value) if value.strip().startswith("[")
                         else [v.strip() for v in value.split(",") if v.strip()])
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}: expected a list, got {value!r}")
            value = list(value)
        elif inner is Any and from_cli:
            value = parse_value(value)
        elif inner is int and not isinstance(value, bool):
            value = _integral(value)
        try:
            OmegaConf.update(self.conf, where, value, merge=False)
        except OmegaConfBaseException as e:
            if inner in _EXPECTED:
                raise ValueError(f"{where}: expected {_EXPECTED[inner]}, got {value!r}") from None
            raise ValueError(f"{where}: {_first_line(e)}") from None


def _integral(value: Any) -> Any:
    """2.0 and "1e3" are integers; anything else is left for the typed node to accept or reject."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return value
        if f.is_integer():
            return int(f)
    return value


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_yaml(path: str, what: str = "config file") -> dict:
    """The top-level mapping of a YAML file (empty file = {}); ValueError if missing or invalid."""
    if not os.path.exists(path):
        raise ValueError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def build_config(data: Optional[dict] = None, overrides: Optional[Iterable[str]] = None) -> TrainConfig:
    """Defaults <- nested mapping ``data`` <- command-line ``overrides`` (not validated here)."""
    b = ConfigBuilder()
    if data:
        b.update(data)
    for key, value in parse_overrides(overrides or []):
        b.set(key, value, from_cli=True)
    return b.build()
