"""The test evaluator: runs the tests in an interpreter the completion's code never enters.

Its source is sent as ``python -I -S -c <codec + this file>``; the job (tests, setup) arrives
on stdin. Names the solution defined are bound to :class:`Remote` handles: calling one sends
the arguments (plain data) to the worker in another sandbox and turns the reply back into
fresh builtin values, so every ``==``, ``<``, ``not``, ``sorted`` ... in a test is computed here,
on ``int``/``str``/``list``/... built by this interpreter, never by an object the completion
made. Results go to a duplicate of fd 1 taken before any test runs, one JSON line per test; the
trusted parent reads them. The worker has no handle on that pipe.
"""

import builtins
import importlib
import os
import resource
import sys
import traceback


class SolutionError(Exception):
    """The solution raised an exception that is not a builtin one, or sent something malformed."""


class _Channel:
    def __init__(self, requests, replies, limit):
        self.requests, self.replies, self.limit, self.gone = requests, replies, limit, False

    def call(self, op, ref, **kw):
        if self.gone:
            raise SolutionError("the solution's process is gone")
        try:
            self.requests.write(dumps({"op": op, "ref": ref, **kw}))  # noqa: F821 (codec)
            reply = read_message(self.replies, self.limit)  # noqa: F821
        except (OSError, ValueError) as e:
            self.gone = True
            raise SolutionError(f"broken channel to the solution: {e}") from None
        if reply is None:
            self.gone = True
            raise SolutionError("the solution's process exited")
        if type(reply) is not dict:
            raise SolutionError("malformed reply from the solution")
        if "e" in reply:
            err = reply["e"]
            name, text = (err[0], err[1]) if type(err) is list and len(err) == 2 else ("?", "")
            cls = getattr(builtins, name, None) if type(name) is str else None
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(str(text))
            raise SolutionError(f"{name}: {text}")
        if reply.get("stop") is True and op == "next":
            raise StopIteration
        return reply


CHANNEL = None


def _to_wire(x):
    if type(x) is Remote:
        return ["r", object.__getattribute__(x, "_ref")]
    raise TypeError(f"cannot pass a {type(x).__name__} to the sandboxed solution")


def _stdlib_module(name):
    if type(name) is not str or name.partition(".")[0] not in sys.stdlib_module_names:
        raise ValueError(f"module {name!r} is not in the standard library")
    return importlib.import_module(name)


def _value(v):
    return decode(v, Remote, _stdlib_module)  # noqa: F821


def _rpc(ref, op, check=None, **kw):
    value = _value(CHANNEL.call(op, ref, **kw).get("v"))
    if check is not None and type(value) is not check:
        raise TypeError(f"the solution's {op}() returned {type(value).__name__}, not {check.__name__}")
    return value


class Remote:
    """An object that lives in the worker. Equality and hashing are by identity only."""

    __slots__ = ("_ref",)

    def __init__(self, ref):
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        enc = lambda v: encode(v, _to_wire)  # noqa: E731, F821
        reply = CHANNEL.call("call", self._ref, args=[enc(a) for a in args],
                             kwargs={str(k): enc(v) for k, v in kwargs.items()})
        back = reply.get("a")
        if type(back) is list and len(back) == len(args):  # in-place changes to list/dict/set args
            for arg, new in zip(args, back):
                if new is not None and type(arg) in (list, dict, set, bytearray):
                    new = _value(new)
                    if type(new) is type(arg):
                        if type(arg) in (list, bytearray):
                            arg[:] = new
                        else:
                            arg.clear()
                            arg.update(new)
        return _value(reply.get("v"))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _rpc(self._ref, "getattr", name=name)

    def __setattr__(self, name, value):
        _rpc(self._ref, "setattr", name=name, value=encode(value, _to_wire))  # noqa: F821

    def __getitem__(self, key):
        return _rpc(self._ref, "getitem", key=encode(key, _to_wire))  # noqa: F821

    def __setitem__(self, key, value):
        _rpc(self._ref, "setitem", key=encode(key, _to_wire), value=encode(value, _to_wire))  # noqa: F821

    def __contains__(self, key):
        return _rpc(self._ref, "contains", bool, key=encode(key, _to_wire))  # noqa: F821

    def __iter__(self):
        return _rpc(self._ref, "iter")

    def __next__(self):
        return _rpc(self._ref, "next")

    def __len__(self):
        return _rpc(self._ref, "len", int)

    def __bool__(self):
        return _rpc(self._ref, "bool", bool)

    def __str__(self):
        return _rpc(self._ref, "str", str)

    def __repr__(self):
        try:
            return _rpc(self._ref, "repr", str)
        except Exception:
            return f"<solution object {self._ref}>"

    def __eq__(self, other):
        return type(other) is Remote and object.__getattribute__(other, "_ref") == self._ref

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self._ref)


def _describe(e):
    return "".join(traceback.format_exception_only(type(e), e)).strip()[-300:]


def evaluator_main():
    global CHANNEL
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    job = json.loads(sys.stdin.buffer.read())  # noqa: F821
    cfg = job["cfg"]
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cfg["cpu_s"]),
                       (resource.RLIMIT_AS, cfg["evaluator_memory_mb"] * mb)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass
    report = os.dup(1)
    os.dup2(2, 1)  # prints from tests go to stderr, not into the report
    out = lambda obj: os.write(report, dumps(obj))  # noqa: E731, F821
    CHANNEL = _Channel(os.fdopen(wfd, "wb", buffering=0), os.fdopen(rfd, "rb"),
                       cfg["max_message_bytes"])
    try:
        hello = read_message(CHANNEL.replies, CHANNEL.limit)  # noqa: F821
    except Exception as e:
        hello = {"loaded": False, "error": "solution: malformed start message: " + _describe(e)}
    if type(hello) is not dict or hello.get("loaded") is not True:
        err = hello.get("error") if type(hello) is dict else None
        out({"loaded": False, "error": str(err or "solution: exited before it loaded")[:400]})
        return
    base = {"__name__": "__main__", "__builtins__": builtins}
    names = hello.get("names")
    for name, enc in (names.items() if type(names) is dict else ()):
        if type(name) is not str or not name.isidentifier() or hasattr(builtins, name):
            continue  # the solution never shadows a builtin the tests use
        try:
            base[name] = (_stdlib_module(name) if name in sys.stdlib_module_names
                          else _value(enc))
        except Exception:
            pass
    setup_error = None
    if job["setup"]:
        try:
            exec(compile(job["setup"], "setup", "exec"), base)
        except BaseException as e:
            setup_error = "setup: " + _describe(e)
    out({"loaded": True})
    for i, test in enumerate(job["tests"]):
        error = setup_error
        if error is None:
            try:
                exec(compile(test, f"test_{i}", "exec"), dict(base))
            except BaseException as e:
                error = _describe(e)
        out({"test": i, "passed": error is None, "error": error})
    out({"done": True})


if __name__ == "__main__":
    evaluator_main()
