"""seccomp: a deny-list of dangerous system calls, as a hand-assembled classic BPF program.

Standard library only (ctypes). Linux on x86_64 or aarch64 (chosen by ``platform.machine()``).

The filter is checked by the kernel on every system call, so ``ctypes`` or a C extension
calling ``syscall()`` directly cannot step around it. Once installed it is inherited by every
child and can never be removed. It is installed with ``SECCOMP_FILTER_FLAG_TSYNC``, so every
thread of the process gets it at once.

Install it *after* the worker's interpreter has started (execve is denied) and after the other
layers that need the calls it denies (namespaces: unshare; Landlock: nothing it denies).

Program layout::

    load arch;  arch != native            -> KILL_PROCESS   (i386 int 0x80, unknown ABIs)
    load nr;    x86_64: nr >= 0x40000000  -> KILL_PROCESS   (the x32 ABI numbering)
    nr in DENIED                          -> ERRNO(EPERM)
    nr == clone3                          -> ERRNO(ENOSYS)  (glibc falls back to clone)
    nr == clone:       flags & CLONE_NEW* -> ERRNO(EPERM)
    nr == socket:      domain allow-list, then type for AF_INET/AF_INET6
    nr == ioctl:       TIOCSTI, TIOCLINUX -> ERRNO(EPERM)  (typing into a terminal)
    nr == personality: anything but a query or PER_LINUX -> ERRNO(EPERM)
    otherwise                             -> ALLOW

EPERM rather than a kill for the deny-list: the workload sees an ordinary ``PermissionError``
it can report, and tests can observe it. Only the arch and x32 checks kill, since a call
through a foreign ABI is evasion by construction and no errno is meaningful there.

Socket policy (an allow-list of domains, which a deny-list cannot express safely):

- AF_UNIX: only with ``network=True`` (a socket by path reaches the user's agents); the
  inherited result channel and ``socketpair`` need no ``socket`` call.
- AF_INET, AF_INET6: SOCK_STREAM only; with ``network=True`` also SOCK_DGRAM (DNS). Never
  SOCK_RAW / SOCK_PACKET. TCP itself is left to Landlock and the network namespace.
- AF_NETLINK: only with ``network=True`` (glibc's getaddrinfo may use NETLINK_ROUTE).
- anything else (AF_PACKET, AF_ALG, AF_VSOCK, AF_BLUETOOTH, AF_KEY, AF_XDP, ...): EAFNOSUPPORT.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from typing import Any

from .libc import libc

__all__ = ["DENIED_SYSCALLS", "action_available", "build_program", "current_mode", "install", "supported"]

# --- classic BPF -------------------------------------------------------------------------------
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JMP_JGE_K = 0x05 | 0x30 | 0x00
BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00
BPF_ALU_AND_K = 0x04 | 0x50 | 0x00
BPF_RET_K = 0x06 | 0x00

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
OFF_NR = 0
OFF_ARCH = 4


def _off_arg_lo(i: int) -> int:
    return 16 + 8 * i  # little endian: the low 32 bits of args[i] come first


SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_STREAM, SOCK_DGRAM = 1, 2
SOCK_TYPE_MASK = 0xF  # strips SOCK_NONBLOCK (0o4000) and SOCK_CLOEXEC (0o2000000)

# Namespace flags in clone()'s first argument. CLONE_NEWTIME (0x80) is absent on purpose: in
# clone() that bit belongs to the exit signal, and new time namespaces need clone3/unshare.
CLONE_NS_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
PERSONALITY_QUERY = 0xFFFFFFFF

# Why each is denied, in one line each.
DENIED_SYSCALLS = {
    "execve": "no new programs: the worker is already the interpreter it needs",
    "execveat": "same as execve",
    "ptrace": "no debugging or memory access of other processes",
    "process_vm_readv": "no reading another process's memory",
    "process_vm_writev": "no writing another process's memory",
    "pidfd_getfd": "no stealing file descriptors from other processes",
    "process_madvise": "no advising another process's memory",
    "kcmp": "no probing other processes' kernel objects",
    "kexec_load": "no loading a new kernel",
    "kexec_file_load": "no loading a new kernel",
    "init_module": "no kernel modules",
    "finit_module": "no kernel modules",
    "delete_module": "no kernel modules",
    "bpf": "no eBPF programs (a large kernel attack surface)",
    "perf_event_open": "no perf events (side channels, kernel attack surface)",
    "userfaultfd": "no userfaultfd (a classic exploit primitive)",
    "keyctl": "no access to kernel keyrings (tokens, credentials)",
    "add_key": "no kernel keyrings",
    "request_key": "no kernel keyrings",
    "unshare": "no new namespaces (user namespaces reopen kernel attack surface)",
    "setns": "no joining other namespaces",
    "mount": "no mounts",
    "umount2": "no unmounting (could reveal what a mount hides)",
    "pivot_root": "no root changes",
    "chroot": "no root changes",
    "move_mount": "no mounts (new mount API)",
    "open_tree": "no mounts (new mount API)",
    "fsopen": "no mounts (new mount API)",
    "fsconfig": "no mounts (new mount API)",
    "fsmount": "no mounts (new mount API)",
    "fspick": "no mounts (new mount API)",
    "mount_setattr": "no mount attribute changes",
    "io_uring_setup": "no io_uring (bypasses syscall filtering, kernel attack surface)",
    "io_uring_enter": "no io_uring",
    "io_uring_register": "no io_uring",
    "name_to_handle_at": "no file handles (open_by_handle_at escapes mount confinement)",
    "open_by_handle_at": "no opening files by handle",
    "acct": "no process accounting",
    "swapon": "no swap changes",
    "swapoff": "no swap changes",
    "reboot": "no reboot",
    "sethostname": "no host name changes",
    "setdomainname": "no domain name changes",
    "syslog": "no kernel log access",
    "quotactl": "no quota changes",
    "settimeofday": "no clock changes",
    "clock_settime": "no clock changes",
    "clock_adjtime": "no clock changes",
    "adjtimex": "no clock changes",
    "iopl": "no raw port I/O",
    "ioperm": "no raw port I/O",
    "uselib": "obsolete loader call",
    "vhangup": "no terminal hangups",
    # Landlock (up to ABI 7) does not cover metadata: without these a worker could chmod or chown
    # its user's own files anywhere (make a key world-readable, a file unreadable).
    "chmod": "no permission changes (Landlock does not cover them)",
    "fchmod": "no permission changes",
    "fchmodat": "no permission changes",
    "fchmodat2": "no permission changes",
    "chown": "no owner changes",
    "fchown": "no owner changes",
    "lchown": "no owner changes",
    "fchownat": "no owner changes",
    "setxattr": "no extended attribute changes",
    "lsetxattr": "no extended attribute changes",
    "fsetxattr": "no extended attribute changes",
    "removexattr": "no extended attribute changes",
    "lremovexattr": "no extended attribute changes",
    "fremovexattr": "no extended attribute changes",
}

_X86_64 = {
    "ioctl": 16, "socket": 41, "clone": 56, "execve": 59, "ptrace": 101, "syslog": 103,
    "uselib": 134, "personality": 135, "vhangup": 153, "pivot_root": 155, "adjtimex": 159,
    "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
    "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "execveat": 322,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
    "mount_setattr": 442,
    "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "setxattr": 188,
    "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198,
    "fremovexattr": 199, "fchownat": 260, "fchmodat": 268, "fchmodat2": 452,
}

# asm-generic numbering; aarch64 has no iopl/ioperm/uselib/vhangup... absent names are skipped.
_AARCH64 = {
    "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "quotactl": 60,
    "acct": 89, "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
    "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142,
    "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "adjtimex": 171,
    "socket": 198, "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220,
    "execve": 221, "swapon": 224, "swapoff": 225, "perf_event_open": 241,
    "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268,
    "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
    "bpf": 280, "execveat": 281, "userfaultfd": 282, "kexec_file_load": 294,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    "vhangup": 58,
    "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
    "fremovexattr": 16, "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55,
    "fchmodat2": 452,
}

_ARCHES = {
    "x86_64": (AUDIT_ARCH_X86_64, _X86_64, 317),
    "amd64": (AUDIT_ARCH_X86_64, _X86_64, 317),
    "aarch64": (AUDIT_ARCH_AARCH64, _AARCH64, 277),
    "arm64": (AUDIT_ARCH_AARCH64, _AARCH64, 277),
}


def supported() -> bool:
    """Whether this platform has a syscall table here (Linux on x86_64 or aarch64)."""
    return sys.platform.startswith("linux") and platform.machine() in _ARCHES


# --- a tiny assembler with labels ---------------------------------------------------------------
class _Asm:
    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def stmt(self, code: int, k: int) -> None:
        self.code.append((code, 0, 0, k & 0xFFFFFFFF))

    def jump(self, code: int, k: int, jt: int | str, jf: int | str) -> None:
        """jt/jf: a label name, or 0 for 'the next instruction'."""
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def ret(self, value: int) -> None:
        self.stmt(BPF_RET_K, value)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.code):
            offs = []
            for target in (jt, jf):
                if isinstance(target, str):
                    off = self.labels[target] - (i + 1)
                    if not 0 <= off <= 255:
                        raise ValueError(f"BPF jump to {target!r} out of range: {off}")
                    offs.append(off)
                else:
                    offs.append(target)
            out += struct.pack("=HBBI", code, offs[0], offs[1], k)
        return bytes(out)


def _errno(e: int) -> int:
    return SECCOMP_RET_ERRNO | (e & 0xFFFF)


def build_program(*, network: bool = False, machine: str | None = None, kill_action: int = SECCOMP_RET_KILL_PROCESS) -> tuple[bytes, list[str]]:
    """Assemble the filter. Returns ``(program_bytes, denied_names)``.

    Raises:
        OSError: no syscall table for this architecture.
    """
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"seccomp layer: no syscall table for {machine!r}")
    audit_arch, table, _ = _ARCHES[machine]
    denied = [name for name in DENIED_SYSCALLS if name in table]

    a = _Asm()
    a.stmt(BPF_LD_W_ABS, OFF_ARCH)
    a.jump(BPF_JMP_JEQ_K, audit_arch, 0, "kill")
    a.stmt(BPF_LD_W_ABS, OFF_NR)
    if audit_arch == AUDIT_ARCH_X86_64:
        a.jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, "kill", 0)
    for name in denied:
        a.jump(BPF_JMP_JEQ_K, table[name], "eperm", 0)
    a.jump(BPF_JMP_JEQ_K, table["clone3"], "enosys", 0)
    a.jump(BPF_JMP_JEQ_K, table["clone"], "clone", 0)
    a.jump(BPF_JMP_JEQ_K, table["socket"], "socket", 0)
    a.jump(BPF_JMP_JEQ_K, table["ioctl"], "ioctl", 0)
    a.jump(BPF_JMP_JEQ_K, table["personality"], "personality", 0)
    a.ret(SECCOMP_RET_ALLOW)

    a.label("clone")  # the kernel reads only the low 32 bits of clone's flags
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(0))
    a.jump(BPF_JMP_JSET_K, CLONE_NS_FLAGS, "eperm", "allow")

    a.label("socket")  # socket(int domain, int type, int protocol): ints, low words only
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(0))
    # A new AF_UNIX socket could connect to the user's agents by path (ssh-agent, docker.sock,
    # the session bus), which Landlock does not cover; socketpair() is another call and stays.
    a.jump(BPF_JMP_JEQ_K, AF_UNIX, "allow" if network else "eperm", 0)
    a.jump(BPF_JMP_JEQ_K, AF_INET, "inet", 0)
    a.jump(BPF_JMP_JEQ_K, AF_INET6, "inet", 0)
    if network:
        a.jump(BPF_JMP_JEQ_K, AF_NETLINK, "allow", 0)
    a.ret(_errno(errno.EAFNOSUPPORT))
    a.label("inet")
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(1))
    a.stmt(BPF_ALU_AND_K, SOCK_TYPE_MASK)
    a.jump(BPF_JMP_JEQ_K, SOCK_STREAM, "allow", 0)
    if network:
        a.jump(BPF_JMP_JEQ_K, SOCK_DGRAM, "allow", 0)
    a.ret(_errno(errno.EPERM))

    a.label("ioctl")
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(1))
    a.jump(BPF_JMP_JEQ_K, TIOCSTI, "eperm", 0)
    a.jump(BPF_JMP_JEQ_K, TIOCLINUX, "eperm", "allow")

    a.label("personality")
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(0))
    a.jump(BPF_JMP_JEQ_K, PERSONALITY_QUERY, "allow", 0)
    a.jump(BPF_JMP_JEQ_K, 0, "allow", "eperm")  # PER_LINUX

    # Classic BPF jumps only forward: every target lives below its users.
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("eperm")
    a.ret(_errno(errno.EPERM))
    a.label("enosys")
    a.ret(_errno(errno.ENOSYS))
    a.label("kill")
    a.ret(kill_action)
    return a.assemble(), denied


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def action_available(action: int) -> bool:
    """SECCOMP_GET_ACTION_AVAIL for one return action (False where seccomp is missing)."""
    if not supported():
        return False
    nr = _ARCHES[platform.machine()][2]
    value = ctypes.c_uint32(action)
    return bool(libc().syscall(ctypes.c_long(nr), ctypes.c_uint(SECCOMP_GET_ACTION_AVAIL), ctypes.c_uint(0), ctypes.byref(value)) == 0)


def current_mode() -> int:
    """prctl(PR_GET_SECCOMP): 0 none, 2 filter; -1 when the kernel has no seccomp."""
    if not sys.platform.startswith("linux"):
        return -1
    res = libc().prctl(PR_GET_SECCOMP, 0, 0, 0, 0)
    return res if res >= 0 else -1


def install(*, network: bool = False) -> dict[str, Any]:
    """Install the deny-list filter on every thread of this process.

    Args:
        network: keep UDP sockets (DNS) and netlink; TCP is always allowed here and left to
            Landlock and the network namespace.

    Returns:
        A dict: ``applied``, ``arch``, ``network``, ``denied`` (syscall names → EPERM),
        ``enosys`` (["clone3"]), ``arg_checks`` (what is filtered by argument), ``kill``
        (what kills the process), ``instructions`` (program length).

    Raises:
        OSError: unsupported architecture, or the kernel refused the filter.
    """
    kill = SECCOMP_RET_KILL_PROCESS if action_available(SECCOMP_RET_KILL_PROCESS) else SECCOMP_RET_KILL_THREAD
    program, denied = build_program(network=network, kill_action=kill)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    lib = libc()
    # Required for an unprivileged filter; also means no setuid binary ever runs above us.
    if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    nr = _ARCHES[platform.machine()][2]
    res = lib.syscall(
        ctypes.c_long(nr), ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog)
    )
    if res != 0:
        err = ctypes.get_errno() if res < 0 else errno.EBUSY
        if res < 0 and err == errno.ENOSYS:
            # Kernels before 3.17 have only the prctl interface (no thread sync there).
            res = lib.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
            if res != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
        else:
            # res > 0: TSYNC failed for the thread with that id (it has an unrelated filter).
            raise OSError(err, f"seccomp(SET_MODE_FILTER, TSYNC) failed: {res if res > 0 else os.strerror(err)}")
    return {
        "applied": True,
        "arch": platform.machine(),
        "network": network,
        "denied": denied,
        "enosys": ["clone3"],
        "arg_checks": {
            "clone": "namespace flags -> EPERM",
            "socket": "AF_INET/6 SOCK_STREAM" + ("; AF_UNIX, SOCK_DGRAM, AF_NETLINK" if network else "")
            + "; other types EPERM, other domains EAFNOSUPPORT",
            "ioctl": "TIOCSTI, TIOCLINUX -> EPERM",
            "personality": "only query / PER_LINUX",
        },
        "kill": ["foreign arch", "x32 ABI"] if platform.machine() in ("x86_64", "amd64") else ["foreign arch"],
        "kill_action": "KILL_PROCESS" if kill == SECCOMP_RET_KILL_PROCESS else "KILL_THREAD",
        "instructions": len(program) // 8,
    }
