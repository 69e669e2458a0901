"""A seccomp filter for the sandbox, compiled here to classic BPF (no library needed).

bubblewrap installs it (``bwrap --seccomp FD``: FD holds an array of ``struct sock_filter``
``{u16 code; u8 jt; u8 jf; u32 k}``) right before it executes the sandboxed interpreter, so
it applies to the interpreter and everything it starts, and cannot be removed.

The filter, in order:

1. the calling convention must be the interpreter's own (``AUDIT_ARCH_X86_64`` or
   ``AUDIT_ARCH_AARCH64``); any other (i386 ``int 0x80`` calls on x86_64) fails with ``EPERM``,
   and so do x32 system calls (numbers with bit 30 set) on x86_64;
2. ``clone3`` fails with ``ENOSYS`` (its flags sit behind a pointer the filter cannot read);
   glibc then falls back to ``clone``, whose flags the filter checks: any namespace-creating
   flag (``CLONE_NEWNS``, ``CLONE_NEWUSER``, ...) fails with ``EPERM``, threads and processes
   are allowed;
3. ``personality`` is allowed only as the query ``personality(0xffffffff)``;
4. ``socket``/``socketpair`` only for ``AF_UNIX``, ``AF_INET``, ``AF_INET6`` (inside the empty
   network namespace); other families (netlink, packet, ``AF_VSOCK``, which is not network
   namespaced and may reach a VM's host) fail with ``EAFNOSUPPORT``;
5. the system calls in :data:`DENIED` fail with ``EPERM``; everything else is allowed.

The numbers are those of the kernel's tables (arch/x86/entry/syscalls/syscall_64.tbl and
include/uapi/asm-generic/unistd.h, which arm64 uses); tests/rewards/test_seccomp.py compares
them with the installed kernel headers where those exist.
"""

from __future__ import annotations

import os
import platform
import struct
import warnings

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97  # the same on x86_64 and arm64

# classic BPF opcodes
LD_ABS_W = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15     # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35     # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x45    # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06     # BPF_RET | BPF_K

# struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];}, little-endian
# on both architectures: the low 32 bits of args[0] are at offset 16.
OFF_NR, OFF_ARCH, OFF_ARG0_LO = 0, 4, 16

# namespace-creating clone flags (CLONE_NEWTIME, 0x80, is in the exit-signal byte for clone())
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
CLONE_NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                  | CLONE_NEWPID | CLONE_NEWNET)
PERSONALITY_QUERY = 0xFFFFFFFF
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

ARCHES = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}

# name: (x86_64, aarch64); None where the architecture has no such call
SYSCALLS = {
    # argument-checked or redirected (not in DENIED)
    "clone": (56, 220),
    "clone3": (435, 435),
    "personality": (135, 92),
    "socket": (41, 198),
    "socketpair": (53, 199),
    # debugging other processes / reading their memory
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    # mounts, namespaces, root changes
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    # kernel keyrings
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    # large kernel interfaces a test never needs
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "fanotify_init": (300, 262),
    "lookup_dcookie": (212, 18),
    "syslog": (103, 116),
    # machine administration
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "iopl": (172, None),
    "ioperm": (173, None),
    "uselib": (134, None),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "vhangup": (153, 58),
}
ARG_CHECKED = ("clone", "clone3", "personality", "socket", "socketpair")
DENIED = tuple(name for name in SYSCALLS if name not in ARG_CHECKED)


def machine() -> str | None:
    """The architecture name used in :data:`ARCHES` for this interpreter, or ``None``."""
    m = platform.machine().lower()
    m = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
    if struct.calcsize("P") != 8 or m not in ARCHES:  # e.g. a 32-bit interpreter on x86_64
        return None
    return m


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _assemble(items: list) -> bytes:
    """``items``: ``(code, jt, jf, k)`` with ``jt``/``jf`` ints or label names, or ``str`` labels."""
    labels, pc = {}, 0
    for item in items:
        if isinstance(item, str):
            labels[item] = pc
        else:
            pc += 1
    out, pc = [], 0
    for item in items:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        offsets = [labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf)]
        if not all(0 <= o <= 255 for o in offsets):
            raise ValueError(f"seccomp: jump out of range at instruction {pc}")
        out.append(_insn(code, offsets[0], offsets[1], k))
        pc += 1
    if not 0 < len(out) <= 4096:
        raise ValueError("seccomp: program too long")
    return b"".join(out)


def program(arch: str) -> bytes:
    """The filter for ``arch`` (``"x86_64"`` or ``"aarch64"``) as ``sock_filter`` bytes."""
    if arch not in ARCHES:
        raise ValueError(f"seccomp: unsupported architecture {arch!r} (supported: {sorted(ARCHES)})")
    col = 0 if arch == "x86_64" else 1
    nr = {name: nums[col] for name, nums in SYSCALLS.items() if nums[col] is not None}

    def ret(value):
        return (RET_K, 0, 0, value)

    items = [(LD_ABS_W, 0, 0, OFF_ARCH), (JEQ_K, 0, "deny", ARCHES[arch]),
             (LD_ABS_W, 0, 0, OFF_NR)]
    if arch == "x86_64":
        items.append((JGE_K, "deny", 0, X32_SYSCALL_BIT))
    items += [(JEQ_K, "clone", 0, nr["clone"]), (JEQ_K, "enosys", 0, nr["clone3"]),
              (JEQ_K, "personality", 0, nr["personality"]),
              (JEQ_K, "socket", 0, nr["socket"]), (JEQ_K, "socket", 0, nr["socketpair"])]
    items += [(JEQ_K, "deny", 0, nr[name]) for name in DENIED if name in nr]
    items += [ret(SECCOMP_RET_ALLOW),
              "clone", (LD_ABS_W, 0, 0, OFF_ARG0_LO), (JSET_K, "deny", "allow", CLONE_NS_FLAGS),
              "personality", (LD_ABS_W, 0, 0, OFF_ARG0_LO), (JEQ_K, "allow", "deny", PERSONALITY_QUERY),
              "socket", (LD_ABS_W, 0, 0, OFF_ARG0_LO)]
    items += [(JEQ_K, "allow", 0, family) for family in SOCKET_FAMILIES]
    items += [ret(SECCOMP_RET_ERRNO | EAFNOSUPPORT),
              "allow", ret(SECCOMP_RET_ALLOW),
              "deny", ret(SECCOMP_RET_ERRNO | EPERM),
              "enosys", ret(SECCOMP_RET_ERRNO | ENOSYS)]
    return _assemble(items)


_warned = []


def filter_fd() -> int | None:
    """A readable fd holding this machine's filter (the caller passes it to bwrap and closes
    it), or ``None`` with a warning (once) where the architecture is not supported."""
    arch = machine()
    if arch is None:
        if not _warned:
            _warned.append(True)
            warnings.warn(f"code sandbox: no seccomp filter for architecture {platform.machine()!r} "
                          f"(supported: {', '.join(ARCHES)}); namespaces and limits still apply",
                          RuntimeWarning, stacklevel=2)
        return None
    data = program(arch)
    r, w = os.pipe()  # the program is < 1 KiB, far below a pipe's buffer
    try:
        if os.write(w, data) != len(data):
            raise OSError("seccomp: short write of the filter program")
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r
