"""The sandbox's seccomp filter: its syscall table, its logic (run by a small BPF interpreter
written here), and what the kernel does with it inside the sandbox (against a control run
without the filter)."""

import os
import re
import struct
import warnings

import pytest

from ratiorl.rewards.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    check_isolation,
    run_tests,
    seccomp,
)

try:
    check_isolation("bwrap")
    SKIP = None
except SandboxUnavailable as e:
    SKIP = str(e)
ARCH = seccomp.machine()
needs_sandbox = pytest.mark.skipif(SKIP is not None or ARCH is None,
                                   reason=f"bubblewrap sandbox unavailable: {SKIP}" if SKIP else
                                   "no seccomp filter for this architecture")
HEADERS = {"x86_64": ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h",
                      "/usr/include/asm-x86/unistd_64.h"],
           "aarch64": ["/usr/include/asm-generic/unistd.h"]}
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97


def _header_numbers(arch):
    for path in HEADERS[arch]:
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            return {m.group(1): int(m.group(2)) for m in
                    re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", text)}, path
    pytest.skip(f"no {arch} kernel syscall header here (looked for {HEADERS[arch]})")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_syscall_numbers_match_the_kernel_headers(arch):
    numbers, path = _header_numbers(arch)
    col = 0 if arch == "x86_64" else 1
    for name, nums in seccomp.SYSCALLS.items():
        assert nums[col] == numbers.get(name), (name, path)


def _run_bpf(prog, nr, arch, arg0=0):
    """Evaluate the classic-BPF program on one ``struct seccomp_data``; returns the action."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0 & 0xFFFFFFFFFFFFFFFF, 0, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_filter_logic(arch):
    prog = seccomp.program(arch)
    assert len(prog) % 8 == 0 and 0 < len(prog) // 8 <= 4096
    audit = seccomp.ARCHES[arch]
    col = 0 if arch == "x86_64" else 1
    nr = {name: nums[col] for name, nums in seccomp.SYSCALLS.items() if nums[col] is not None}
    allow, eperm = 0x7FFF0000, 0x00050000 | EPERM

    def run(name_or_nr, arg0=0, a=audit):
        return _run_bpf(prog, nr[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr, a, arg0)

    for name in seccomp.DENIED:
        if name in nr:
            assert run(name) == eperm, name
    assert {"ptrace", "unshare", "mount", "keyctl", "bpf", "setns", "io_uring_setup"} <= set(seccomp.DENIED)
    read, write, getpid = (0, 1, 39) if arch == "x86_64" else (63, 64, 172)
    for n in (read, write, getpid):
        assert run(n) == allow
    assert run("clone3") == 0x00050000 | ENOSYS
    thread_flags = 0x3D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    assert run("clone", thread_flags) == allow and run("clone", 17) == allow  # thread, fork
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert run("clone", 17 | flag) == eperm, hex(flag)
    assert run("personality", 0xFFFFFFFF) == allow and run("personality", 0x0040000) == eperm
    for fam in (1, 2, 10):
        assert run("socket", fam) == allow and run("socketpair", fam) == allow
    for fam in (16, 17, 40):  # netlink, packet, vsock
        assert run("socket", fam) == 0x00050000 | EAFNOSUPPORT
    other = seccomp.AUDIT_ARCH_AARCH64 if arch == "x86_64" else seccomp.AUDIT_ARCH_X86_64
    assert run(read, a=other) == eperm and run(read, a=0x40000003) == eperm  # i386
    assert run(0x40000000 + getpid) == (eperm if arch == "x86_64" else allow)


def test_unsupported_architecture_warns_and_installs_nothing(monkeypatch):
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "riscv64")
    monkeypatch.setattr(seccomp, "_warned", [])
    with pytest.warns(RuntimeWarning, match="no seccomp filter for architecture 'riscv64'"):
        assert seccomp.filter_fd() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seccomp.filter_fd() is None  # warned once
    with pytest.raises(ValueError, match="unsupported architecture"):
        seccomp.program("riscv64")


PROBE = """
import ctypes, os, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
NR = {nr!r}
def call(name, *args):
    r = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
    return 0 if r >= 0 else ctypes.get_errno()
def probe():
    return {{"ptrace": call("ptrace", 0, 0, 0, 0),        # PTRACE_TRACEME
             "unshare": call("unshare", 0),
             "mount": call("mount", 0, 0, 0, 0, 0),
             "keyctl": call("keyctl", 0, -3, 0),           # KEYCTL_GET_KEYRING_ID, session
             "bpf": call("bpf", 1000, 0, 0),
             "clone3": call("clone3", 0, 0)}}
def extra():
    out = {{}}
    for fam in (1, 40):  # AF_UNIX, AF_VSOCK (only created, never connected)
        try:
            socket.socket(fam, socket.SOCK_STREAM).close()
            out[fam] = 0
        except OSError as e:
            out[fam] = e.errno
    box = []
    t = threading.Thread(target=lambda: box.append(sum(range(10))))
    t.start(); t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return [out, box, os.waitpid(pid, 0)[1] >> 8]
"""


def _probe(tests):
    nr = {name: nums[0 if ARCH == "x86_64" else 1] for name, nums in seccomp.SYSCALLS.items()}
    result = run_tests(PROBE.format(nr=nr), tests, SandboxLimits(timeout_s=10.0, memory_mb=256))
    assert result.report is not None and result.report["loaded"], (result.report, result.stderr)
    return result.report


@needs_sandbox
def test_kernel_enforces_the_filter_in_the_sandbox(monkeypatch):
    denied = {"ptrace": EPERM, "unshare": EPERM, "mount": EPERM, "keyctl": EPERM, "bpf": EPERM,
              "clone3": ENOSYS}
    report = _probe([f"assert probe() == {denied!r}, probe()",
                     f"assert extra() == [{{1: 0, 40: {EAFNOSUPPORT}}}, [45], 7], extra()"])
    assert report["passed"] == 2, report
    # control: the same calls without the filter do not all fail with EPERM (so the test above
    # measures the filter, not the missing capabilities)
    monkeypatch.setattr(seccomp, "filter_fd", lambda: None)
    control = ("r = probe()\nassert [k for k in ('ptrace', 'unshare', 'keyctl', 'bpf', 'clone3') "
               "if r[k] in (1, 38)] == [], r")
    report = _probe([control])
    assert report["passed"] == 1, report
