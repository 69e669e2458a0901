"""Plain-data codec used on both sides of the sandbox boundary (no imports from ratiorl).

This file's source is sent into the sandboxed interpreters and prepended to the worker and
evaluator programs, so it only uses the standard library. A value crosses the boundary as
JSON built from exact builtin types only (``type(x) is int``, never ``isinstance``): a subclass
of ``int`` or ``list`` with a forged ``__eq__`` cannot travel. Containers are tagged lists
(``["l", [...]]``, ``["t", ...]``, ``["d", [[k, v], ...]]``, ...); objects that are not plain
data travel as handles ``["r", id]``, modules as ``["m", name]``.
"""

import json

MAX_DEPTH = 100
_SCALARS = (type(None), bool, int, float, str)


def encode(x, handle, depth=0):
    """``x`` as JSON-ready plain data; ``handle(x)`` encodes anything else (or raises)."""
    t = type(x)
    if t in _SCALARS:
        return x
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to cross the sandbox boundary")
    d = depth + 1
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "s", frozenset: "S"}[t]
        return [tag, [encode(v, handle, d) for v in x]]
    if t is dict:
        return ["d", [[encode(k, handle, d), encode(v, handle, d)] for k, v in x.items()]]
    if t is bytes or t is bytearray:
        return ["b" if t is bytes else "B", x.hex()]
    if t is complex:
        return ["c", [x.real, x.imag]]
    if t is range:
        return ["R", [x.start, x.stop, x.step]]
    if t is type(json):
        return ["m", x.__name__]
    return handle(x)


def decode(v, resolve, module, depth=0):
    """Inverse of :func:`encode`; ``resolve(id)`` / ``module(name)`` turn handles into objects.

    Only the shapes ``encode`` produces are accepted; anything else raises ``ValueError``.
    """
    t = type(v)
    if t in _SCALARS:
        return v
    if t is not list or len(v) != 2 or type(v[0]) is not str or depth > MAX_DEPTH:
        raise ValueError("malformed value from the other side of the sandbox")
    tag, body = v
    d = depth + 1
    if tag in ("l", "t", "s", "S") and type(body) is list:
        items = [decode(x, resolve, module, d) for x in body]
        return {"l": list, "t": tuple, "s": set, "S": frozenset}[tag](items)
    if tag == "d" and type(body) is list:
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict from the other side of the sandbox")
            out[decode(pair[0], resolve, module, d)] = decode(pair[1], resolve, module, d)
        return out
    if tag in ("b", "B") and type(body) is str:
        return (bytes if tag == "b" else bytearray).fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) in (int, float) for p in body):
        return complex(body[0], body[1])
    if tag == "R" and type(body) is list and len(body) == 3 and all(type(p) is int for p in body):
        return range(*body)
    if tag == "r" and type(body) is int:
        return resolve(body)
    if tag == "m" and type(body) is str:
        return module(body)
    raise ValueError("malformed value from the other side of the sandbox")


def dumps(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def read_message(stream, limit):
    """One JSON line from ``stream`` (at most ``limit`` bytes); ``None`` at end of stream."""
    line = stream.readline(limit + 1)
    if not line:
        return None
    if len(line) > limit or not line.endswith(b"\n"):
        raise ValueError("message from the other side of the sandbox is too long or truncated")
    return json.loads(line)
