"""The solution worker: runs inside the sandbox, loads the completion's code, answers calls.

Its source is sent as ``python -I -S -c <codec + this file>``; the completion's code arrives on
stdin. It reads requests (plain data) from the fd in ``argv[1]`` and writes replies to the fd
in ``argv[2]``. Nothing here is trusted: the completion runs in this interpreter and can
replace any of it. What it can send back is plain data, which is the same power a correct
function has when it returns a value; the verdict is computed elsewhere (``_evaluator.py``).
"""

import builtins
import importlib
import os
import resource
import sys
import traceback


def _describe(e):
    return "".join(traceback.format_exception_only(type(e), e)).strip()[-300:]


def _limit(res, value):
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass


def _serve(msg, refs, handle):
    def dec(v):
        return decode(v, refs.__getitem__, importlib.import_module)  # noqa: F821 (codec)

    try:
        op, obj = msg["op"], refs[msg["ref"]]
        if op == "call":
            args = [dec(a) for a in msg["args"]]
            kwargs = {str(k): dec(v) for k, v in msg["kwargs"].items()}
            value = obj(*args, **kwargs)
            back = [encode(a, handle) if type(a) in (list, dict, set, bytearray) else None  # noqa: F821
                    for a in args]
            return {"v": encode(value, handle), "a": back}  # noqa: F821
        if op == "next":
            try:
                value = next(obj)
            except StopIteration:
                return {"stop": True}
        elif op == "getattr":
            value = getattr(obj, str(msg["name"]))
        elif op == "setattr":
            setattr(obj, str(msg["name"]), dec(msg["value"]))
            value = None
        elif op == "getitem":
            value = obj[dec(msg["key"])]
        elif op == "setitem":
            obj[dec(msg["key"])] = dec(msg["value"])
            value = None
        elif op == "contains":
            value = dec(msg["key"]) in obj
        else:
            value = {"iter": iter, "len": len, "bool": bool, "str": str, "repr": repr}[op](obj)
        return {"v": encode(value, handle)}  # noqa: F821
    except BaseException as e:  # the solution's SystemExit etc. fail that call, nothing more
        return {"e": [type(e).__name__, str(e)[:300]]}


def worker_main():
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    job = json.loads(sys.stdin.buffer.read())  # noqa: F821 (codec imports json)
    cfg, limit = job["cfg"], job["cfg"]["max_message_bytes"]
    mb = 1024 * 1024
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, cfg["cpu_s"])
    _limit(resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb)
    _limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    _limit(resource.RLIMIT_NPROC, cfg["max_processes"])
    _limit(resource.RLIMIT_AS, cfg["memory_mb"] * mb)
    requests = os.fdopen(rfd, "rb")
    replies = os.fdopen(wfd, "wb", buffering=0)
    refs = {}

    def handle(x):
        # Counter, OrderedDict, defaultdict, namedtuple... travel as their builtin base (the
        # conversion runs here, so it only decides what the solution "returned"); any other
        # object stays here and travels as a handle.
        t = type(x)
        if t.__module__ == "collections" or hasattr(t, "_fields"):
            for base in (dict, list, tuple, set, frozenset, str, bytes, int, float):
                if isinstance(x, base):
                    return encode(base(x), handle)  # noqa: F821
        refs[id(x)] = x  # kept alive, so ids are never reused
        return ["r", id(x)]

    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "solution.py", "exec"), ns)
    except BaseException as e:
        replies.write(dumps({"loaded": False, "error": "solution: " + _describe(e)}))  # noqa: F821
        os._exit(0)
    names = {}
    for key, value in list(ns.items()):
        if not key.startswith("__"):
            try:
                names[key] = encode(value, handle)  # noqa: F821
            except Exception:
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    replies.write(dumps({"loaded": True, "names": names}))  # noqa: F821
    while True:
        try:
            msg = read_message(requests, limit)  # noqa: F821
        except Exception:
            break
        if msg is None:
            break
        try:
            out = dumps(_serve(msg, refs, handle))  # noqa: F821
        except Exception as e:  # e.g. a huge int that json cannot write
            out = dumps({"e": [type(e).__name__, str(e)[:300]]})  # noqa: F821
        replies.write(out)
    os._exit(0)


if __name__ == "__main__":
    worker_main()
