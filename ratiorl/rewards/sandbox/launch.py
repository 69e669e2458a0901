"""Start the two sandboxed interpreters (worker, evaluator) and tear them down completely.

``isolation="bwrap"`` (default): each interpreter runs under bubblewrap in new user, PID,
network, mount, IPC, UTS and cgroup namespaces, with a read-only view of ``/usr`` and of the
Python installation, an empty size-limited tmpfs at ``/tmp`` as the working directory, a fresh
``/proc`` and ``/dev``, no host ``/tmp``, ``/dev/shm``, ``/etc`` or home directories, a cleared
environment, ``--new-session``, ``--die-with-parent`` and no further user namespaces. As root
bubblewrap itself is started as ``nobody`` (uid 65534) so that the sandbox's uid is not root on
the host and ``RLIMIT_NPROC`` applies; since Linux 5.14 that limit counts processes per user
namespace, and every run has its own, so concurrent runs never share it. A seccomp filter is
added where :mod:`.seccomp` supports the architecture.

``isolation="process"``: an explicit opt-in to a weaker sandbox for machines without
bubblewrap or user namespaces (plain child processes; see docs/rewards_and_tasks.md).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import seccomp

NOBODY = 65534
FIX = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: dnf install "
       "bubblewrap) and allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
       "kernel.unprivileged_userns_clone=1 where it exists, and on Ubuntu 24.04+ "
       "kernel.apparmor_restrict_unprivileged_userns=0), or opt into the weaker process sandbox "
       "explicitly with code_tests(isolation='process') / SandboxLimits(isolation='process')")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up here; the message names the fix."""


def python_exe() -> str:
    return os.path.realpath(sys.executable)


_lock = threading.Lock()
_state: dict = {}


def _walkable(path: str) -> bool:
    """Whether every directory above ``path`` can be entered by any user."""
    while path not in ("/", ""):
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


# As root with the interpreter where nobody cannot walk (pyenv under a 0700 /root): bind it to
# a walkable place in a private mount namespace (the host's mounts are untouched), then drop to
# nobody and start bubblewrap there. $0 is the installation, $1 the mount point.
_ROOT_HELPER = ('mount -t tmpfs -o size=64k,mode=0755 ratiorl "$1" && mkdir "$1/p" && '
                'mount --bind "$0" "$1/p" && shift && exec "$@"')


def _mount_point() -> str:
    for cand in ("/mnt", "/media", "/srv", "/opt"):
        if os.path.isdir(cand) and not os.path.islink(cand):
            return cand
    raise SandboxUnavailable(f"code sandbox: no directory to mount the interpreter on; {FIX}")


def bwrap_argv(tmp_mb: int, seccomp_fd: int | None = None) -> list[str]:
    """The command prefix that starts a program in a fresh bubblewrap sandbox; ``seccomp_fd``
    (from :func:`.seccomp.filter_fd`, which the caller must pass on and close) adds the filter."""
    exe = shutil.which("bwrap")
    if exe is None:
        raise SandboxUnavailable(f"code sandbox: bubblewrap (bwrap) is not installed; {FIX}")
    argv = [exe, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--as-pid-1",
            "--new-session", "--clearenv", "--uid", "1000", "--gid", "1000",
            "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name, value in ENV.items():
        argv += ["--setenv", name, value]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(int(tmp_mb) << 20), "--tmpfs", "/tmp",
             "--chdir", "/tmp"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    base = os.path.realpath(sys.base_prefix)
    outside_usr = not (base == "/usr" or base.startswith("/usr/"))
    if os.geteuid() != 0:
        return argv + (["--ro-bind", base, base] if outside_usr else []) + ["--"]
    drop = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
            "--clear-groups", "--"]
    if not outside_usr or _walkable(base):
        return drop + argv + (["--ro-bind", base, base] if outside_usr else []) + ["--"]
    mnt = _mount_point()
    unshare = shutil.which("unshare") or "unshare"
    return ([unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _ROOT_HELPER,
             base, mnt] + drop + argv + ["--ro-bind", mnt + "/p", base, "--"])


def as_nobody() -> dict:
    """Popen keywords that start the child as nobody when we are root (empty otherwise)."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}


def check_bwrap() -> None:
    """Raise :class:`SandboxUnavailable` unless a bubblewrap sandbox starts here (probed once)."""
    with _lock:
        if "bwrap_error" not in _state:
            fd = None
            try:
                fd = seccomp.filter_fd()
                prefix = bwrap_argv(1, fd)
                proc = subprocess.run([*prefix, python_exe(), "-I", "-S", "-c", "import threading"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, env=ENV, timeout=30, check=False,
                                      pass_fds=[] if fd is None else [fd])
                err = None if proc.returncode == 0 else proc.stderr.decode(errors="replace")[-300:]
            except SandboxUnavailable as e:
                err = str(e)
            except (OSError, subprocess.SubprocessError) as e:
                err = str(e)
            finally:
                if fd is not None:
                    os.close(fd)
            _state["bwrap_error"] = err
        err = _state["bwrap_error"]
    if err is not None:
        if "not installed" in err:
            raise SandboxUnavailable(err)
        raise SandboxUnavailable(f"code sandbox: bubblewrap cannot create its namespaces or "
                                 f"seccomp filter here ({err.strip()}); {FIX}")


class Sandboxed:
    """One interpreter started in its own sandbox; ``kill()`` removes it and all it started."""

    def __init__(self, source: str, args: list[str], fds: list[int], isolation: str, tmp_mb: int,
                 stdout, stderr, drop: bool):
        self.isolation = isolation
        self.workdir = self.sync = filt = None
        # process mode, as root: the worker runs as nobody where nobody can reach the interpreter
        extra = as_nobody() if drop and _walkable(os.path.realpath(sys.base_prefix)) else {}
        cmd = [python_exe(), "-I", "-S", "-c", source, *args]
        if isolation == "bwrap":
            # bubblewrap keeps --sync-fd open until the sandbox is gone: EOF on our end means
            # its PID namespace is empty (see kill()).
            filt = seccomp.filter_fd()
            try:
                prefix = bwrap_argv(tmp_mb, filt)
            except BaseException:
                if filt is not None:
                    os.close(filt)
                raise
            self.sync, sync_w = os.pipe()
            cmd, cwd, extra = prefix[:-1] + ["--sync-fd", str(sync_w), "--"] + cmd, "/", {}
            fds = fds + [sync_w] + ([] if filt is None else [filt])
        else:
            self.workdir = cwd = tempfile.mkdtemp(prefix="ratiorl-sandbox-")
            if extra:
                os.chown(cwd, NOBODY, NOBODY)
        try:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env={**ENV, "HOME": cwd, "TMPDIR": cwd},
                                         stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                         pass_fds=fds, close_fds=True, start_new_session=True,
                                         **extra)
        except BaseException:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self.sync is not None:
                os.close(self.sync)
                self.sync = None
                os.close(sync_w)
            raise
        else:
            if self.sync is not None:
                os.close(sync_w)
        finally:
            if filt is not None:
                os.close(filt)

    def kill(self) -> None:
        """SIGKILL the sandbox's init (the kernel then kills every process in its PID namespace),
        let bubblewrap reap it, and return once the namespace is empty (EOF on the sync pipe)."""
        proc = self.proc
        if self.isolation == "bwrap" and proc.poll() is None:
            # With --as-pid-1 bubblewrap's child is the namespace's init; bubblewrap reaps it
            # (so no zombie is left to a container's pid 1) once the kernel has killed the rest.
            for child in _children(proc.pid):
                _signal(child)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(proc.pid)
        proc.wait()
        if self.sync is not None:
            deadline = time.monotonic() + 10.0
            try:
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([self.sync], [], [], 0.5)
                    if ready and not os.read(self.sync, 4096):
                        break
            finally:
                os.close(self.sync)
                self.sync = None
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []
