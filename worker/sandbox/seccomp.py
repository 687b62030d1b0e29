"""seccomp: an allow-list of system calls, as a hand-assembled classic BPF program.

Standard library only (ctypes). Linux on x86_64 or aarch64 (chosen by ``platform.machine()``).

The filter is checked by the kernel on every system call, so ``ctypes`` or a C extension
calling ``syscall()`` directly cannot step around it. Once installed it is inherited by every
child and can never be removed. It is installed with ``SECCOMP_FILTER_FLAG_TSYNC``, so every
thread of the process gets it at once.

Install it *after* the worker's interpreter has started (execve is denied) and after the other
layers that need the calls it denies (namespaces: unshare; Landlock: nothing it denies).

Every call number gets one of these answers, decided by name in this module:

- ``ALLOWED``: what Python, torch, numpy and OpenMP use (the groups of Docker's default profile
  and systemd's ``@system-service``, less what follows);
- ``DENIED_SYSCALLS``: refused with EPERM, each with its reason (a ``PermissionError`` the
  workload can report);
- ``UNSUPPORTED``: reading extended attributes, refused with EOPNOTSUPP (a filesystem without
  them, which every library copes with);
- ``ARG_CHECKED``: decided by an argument (clone, socket, ioctl, fcntl, personality) or by the
  memory bound in force (fork, memfd_create);
- anything else, including every number newer than the table (``syscall_table.NEWEST``): ENOSYS,
  so a call a newer kernel adds stays refused until it is read and listed here.

Program layout::

    load arch;  arch != native            -> KILL_PROCESS   (i386 int 0x80, unknown ABIs)
    load nr;    x86_64: nr >= 0x40000000  -> KILL_PROCESS   (the x32 ABI numbering)
    nr in an ALLOWED range                -> ALLOW          (a binary search over the ranges)
    nr in ARG_CHECKED                     -> its argument check
    nr in DENIED                          -> ERRNO(EPERM)
    nr in UNSUPPORTED                     -> ERRNO(EOPNOTSUPP)
    otherwise                             -> ERRNO(ENOSYS)

Only the arch and x32 checks kill, since a call through a foreign ABI is evasion by
construction and no errno is meaningful there.

Argument checks:

- clone: namespace flags -> EPERM; with ``one_address_space``, a new process (no CLONE_VM) too.
- clone3 -> ENOSYS (its flags sit in memory, out of the filter's reach; glibc falls back to clone).
- fork -> EPERM with ``one_address_space``; vfork (CLONE_VM: the same address space) stays.
- memfd_create -> EPERM without ``memfds``: results then travel inline.
- ioctl: TIOCSTI, TIOCLINUX (typing into a terminal), FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR
  (chattr: the metadata of the user's files) -> EPERM.
- fcntl: F_SETPIPE_SZ -> EPERM, setsockopt: SO_SNDBUF, SO_RCVBUF (and the FORCE forms) -> EPERM:
  a pipe keeps its 64 KiB, a socket its default buffers, a bounded cost per descriptor
  (``protocol.DESCRIPTOR_BUFFER_BYTES``).
- personality: anything but a query or PER_LINUX -> EPERM.
- socket: an allow-list of domains, then of types for AF_INET/AF_INET6:

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
import functools
import os
import platform
import struct
import sys
from typing import Any

from . import syscall_table
from .libc import libc

__all__ = [
    "ALLOWED",
    "ARG_CHECKED",
    "DENIED_SYSCALLS",
    "LEFT_OUT",
    "UNSUPPORTED",
    "action_available",
    "build_program",
    "current_mode",
    "install",
    "newest_known",
    "supported",
]

# --- classic BPF -------------------------------------------------------------------------------
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JA = 0x05 | 0x00
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JMP_JGT_K = 0x05 | 0x20 | 0x00
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
CLONE_VM = 0x00000100
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
# _IOW('f', 2, long), _IOW('f', 2, int), _IOW('X', 32, struct fsxattr): the same on both arches.
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_SETFLAGS = 0x40046602
FS_IOC_FSSETXATTR = 0x401C5820
F_SETPIPE_SZ = 1031
SOL_SOCKET = 1
SOCKET_BUFFER_OPTIONS = (7, 8, 32, 33)  # SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE
PERSONALITY_QUERY = 0xFFFFFFFF

# What the workload may call, by group. A name a table lacks (aarch64 has no open, fork, ...) is
# skipped there.
ALLOWED = frozenset(
    # files and descriptors (which files: Landlock, namespaces and the uid drop decide)
    "read write pread64 pwrite64 readv writev preadv pwritev preadv2 pwritev2 lseek close "
    "close_range open openat openat2 creat dup dup2 dup3 flock fsync fdatasync sync_file_range "
    "truncate ftruncate fallocate fadvise64 readahead sendfile splice tee vmsplice copy_file_range "
    "stat fstat lstat newfstatat statx statfs fstatfs access faccessat faccessat2 readlink "
    "readlinkat getdents getdents64 getcwd chdir fchdir mkdir mkdirat rmdir unlink unlinkat rename "
    "renameat renameat2 link linkat symlink symlinkat mknod mknodat umask cachestat "
    "poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait "
    "epoll_pwait2 eventfd eventfd2 inotify_init inotify_init1 inotify_add_watch inotify_rm_watch "
    "pipe pipe2 signalfd signalfd4 timerfd_create timerfd_settime timerfd_gettime "
    # memory (RLIMIT_AS and the memory bound decide how much)
    "mmap munmap mprotect mremap madvise brk msync mincore mlock mlock2 munlock mlockall "
    "munlockall membarrier mbind get_mempolicy set_mempolicy set_mempolicy_home_node pkey_alloc "
    "pkey_free pkey_mprotect mseal map_shadow_stack "
    # threads, processes, signals, time
    "vfork exit exit_group wait4 waitid kill tkill tgkill getpid getppid gettid getpgid getpgrp "
    "getsid setsid setpgid getuid geteuid getgid getegid getgroups setgroups getresuid getresgid setuid "
    "setgid setreuid setregid setresuid setresgid setfsuid setfsgid capget capset prctl arch_prctl "
    "set_tid_address set_robust_list get_robust_list rseq futex futex_waitv futex_wake futex_wait "
    "futex_requeue sched_yield sched_getaffinity sched_setaffinity sched_getparam sched_setparam "
    "sched_getscheduler sched_setscheduler sched_get_priority_max sched_get_priority_min "
    "sched_rr_get_interval sched_getattr sched_setattr getpriority setpriority ioprio_get "
    "ioprio_set getrlimit setrlimit prlimit64 getrusage times uname sysinfo getrandom getcpu "
    "restart_syscall pause nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday time "
    "alarm getitimer setitimer timer_create timer_settime timer_gettime timer_getoverrun "
    "timer_delete rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait "
    "rt_sigqueueinfo rt_tgsigqueueinfo rt_sigsuspend sigaltstack pidfd_open pidfd_send_signal "
    # sockets (which: the socket check below, Landlock and the network namespace)
    "socketpair bind listen accept accept4 connect getsockname getpeername sendto recvfrom sendmsg "
    "recvmsg sendmmsg recvmmsg shutdown getsockopt "
    # tightening one's own confinement further
    "seccomp landlock_create_ruleset landlock_add_rule landlock_restrict_self".split()
)

# Left out on purpose, answered ENOSYS like a number the table lacks: obsolete or never
# implemented, 32-bit TLS, and the security modules' self-attributes.
LEFT_OUT = frozenset(
    "_sysctl afs_syscall create_module epoll_ctl_old epoll_wait_old get_kernel_syms getpmsg putpmsg "
    "lookup_dcookie nfsservctl query_module remap_file_pages security sysfs tuxcall ustat vserver "
    "get_thread_area set_thread_area lsm_get_self_attr lsm_list_modules".split()
)

# Decided by an argument or by the memory bound in force (see the module docstring).
ARG_CHECKED = frozenset("clone clone3 fork memfd_create socket setsockopt ioctl fcntl personality".split())

# Refused with EPERM; why, in one line each.
DENIED_SYSCALLS = {
    "execve": "no new programs: the worker is already the interpreter it needs",
    "execveat": "same as execve",
    "ptrace": "no debugging or memory access of other processes",
    "process_vm_readv": "no reading another process's memory",
    "process_vm_writev": "no writing another process's memory",
    "pidfd_getfd": "no stealing file descriptors from other processes",
    "process_madvise": "no advising another process's memory",
    "process_mrelease": "no reaping another process's memory",
    "move_pages": "no moving another process's memory",
    "migrate_pages": "no moving another process's memory",
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
    "open_tree_attr": "no mounts (new mount API)",
    "fsopen": "no mounts (new mount API)",
    "fsconfig": "no mounts (new mount API)",
    "fsmount": "no mounts (new mount API)",
    "fspick": "no mounts (new mount API)",
    "mount_setattr": "no mount attribute changes",
    "statmount": "no reading the mount table past what /proc shows",
    "listmount": "no reading the mount table past what /proc shows",
    "io_uring_setup": "no io_uring (bypasses syscall filtering, kernel attack surface)",
    "io_uring_enter": "no io_uring",
    "io_uring_register": "no io_uring",
    "name_to_handle_at": "no file handles (open_by_handle_at escapes mount confinement)",
    "open_by_handle_at": "no opening files by handle",
    "fanotify_init": "no watching the user's files",
    "fanotify_mark": "no watching the user's files",
    "acct": "no process accounting",
    "swapon": "no swap changes",
    "swapoff": "no swap changes",
    "reboot": "no reboot",
    "sethostname": "no host name changes",
    "setdomainname": "no domain name changes",
    "syslog": "no kernel log access",
    "quotactl": "no quota changes",
    "quotactl_fd": "no quota changes",
    "settimeofday": "no clock changes",
    "clock_settime": "no clock changes",
    "clock_adjtime": "no clock changes",
    "adjtimex": "no clock changes",
    "iopl": "no raw port I/O",
    "ioperm": "no raw port I/O",
    "modify_ldt": "no segment descriptors (an old exploit primitive)",
    "uselib": "obsolete loader call",
    "vhangup": "no terminal hangups",
    "sync": "no flushing every filesystem of the machine",
    "syncfs": "no flushing a whole filesystem",
    "lsm_set_self_attr": "no security-module attribute changes",
    # Memory that neither RLIMIT_AS nor the scratch tmpfs counts (see limits.py).
    "memfd_secret": "no secret memory (outside memory_limit)",
    "shmget": "no System V shared memory (outside memory_limit)",
    "shmat": "no System V shared memory",
    "shmdt": "no System V shared memory",
    "shmctl": "no System V shared memory",
    "msgget": "no System V message queues (kernel memory outside memory_limit)",
    "msgsnd": "no System V message queues",
    "msgrcv": "no System V message queues",
    "msgctl": "no System V message queues",
    "semget": "no System V semaphores",
    "semop": "no System V semaphores",
    "semtimedop": "no System V semaphores",
    "semctl": "no System V semaphores",
    "mq_open": "no POSIX message queues (kernel memory outside memory_limit)",
    "mq_unlink": "no POSIX message queues",
    "mq_timedsend": "no POSIX message queues",
    "mq_timedreceive": "no POSIX message queues",
    "mq_notify": "no POSIX message queues",
    "mq_getsetattr": "no POSIX message queues",
    "io_setup": "no kernel AIO contexts (kernel memory outside memory_limit)",
    "io_destroy": "no kernel AIO",
    "io_submit": "no kernel AIO",
    "io_cancel": "no kernel AIO",
    "io_getevents": "no kernel AIO",
    "io_pgetevents": "no kernel AIO",
    # The metadata of the user's files, which Landlock (up to ABI 7) does not cover: without
    # these a worker could chmod, chown, set ACLs on or re-date its user's own files anywhere (a
    # key made world-readable, a file unreadable). Refused everywhere, the scratch included.
    "chmod": "no permission changes (Landlock does not cover them)",
    "fchmod": "no permission changes",
    "fchmodat": "no permission changes",
    "fchmodat2": "no permission changes",
    "chown": "no owner changes",
    "fchown": "no owner changes",
    "lchown": "no owner changes",
    "fchownat": "no owner changes",
    "setxattr": "no extended attribute changes (system.posix_acl_access is a chmod)",
    "lsetxattr": "no extended attribute changes",
    "fsetxattr": "no extended attribute changes",
    "setxattrat": "no extended attribute changes",
    "removexattr": "no extended attribute changes",
    "lremovexattr": "no extended attribute changes",
    "fremovexattr": "no extended attribute changes",
    "removexattrat": "no extended attribute changes",
    "file_setattr": "no inode attribute changes (chattr)",
    "utime": "no time stamp changes",
    "utimes": "no time stamp changes",
    "futimesat": "no time stamp changes",
    "utimensat": "no time stamp changes (futimens too)",
}

# Refused with EOPNOTSUPP: reading extended attributes (labels, ACLs, what a user tagged their
# files with) is answered as by a filesystem without them.
UNSUPPORTED = frozenset(
    "getxattr lgetxattr fgetxattr getxattrat listxattr llistxattr flistxattr listxattrat file_getattr".split()
)

_ARCHES = {
    "x86_64": (AUDIT_ARCH_X86_64, syscall_table.X86_64, syscall_table.X86_64["seccomp"]),
    "amd64": (AUDIT_ARCH_X86_64, syscall_table.X86_64, syscall_table.X86_64["seccomp"]),
    "aarch64": (AUDIT_ARCH_AARCH64, syscall_table.AARCH64, syscall_table.AARCH64["seccomp"]),
    "arm64": (AUDIT_ARCH_AARCH64, syscall_table.AARCH64, syscall_table.AARCH64["seccomp"]),
}


def supported() -> bool:
    """Whether this platform has a syscall table here (Linux on x86_64 or aarch64)."""
    return sys.platform.startswith("linux") and platform.machine() in _ARCHES


def newest_known() -> tuple[str, int]:
    """The newest system call the filter knows by name (every later number is refused)."""
    return syscall_table.NEWEST


# --- a tiny assembler with labels ---------------------------------------------------------------
class _Asm:
    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def stmt(self, code: int, k: int) -> None:
        self.code.append((code, 0, 0, k & 0xFFFFFFFF))

    def jump(self, code: int, k: int, jt: int | str, jf: int | str) -> None:
        """jt/jf: a label name, or a count of instructions to skip (0: the next one)."""
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def goto(self, target: str) -> None:
        """An unconditional jump (32-bit offset: any distance forward)."""
        self.code.append((BPF_JMP_JA, None, None, target))  # type: ignore[arg-type]

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def ret(self, value: int) -> None:
        self.stmt(BPF_RET_K, value)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.code):
            if code == BPF_JMP_JA:
                out += struct.pack("=HBBI", code, 0, 0, self.labels[k] - (i + 1))  # type: ignore[index]
                continue
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


def _ranges(numbers: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _search(a: _Asm, ranges: list[tuple[int, int]], miss: str) -> None:
    """Allow nr (in the accumulator) when it lies in one of ``ranges``, else jump to ``miss``.

    A binary search: a few instructions for any allowed call, however long the list.
    """
    if len(ranges) == 1:
        lo, hi = ranges[0]
        a.jump(BPF_JMP_JGE_K, lo, 0, 2)
        a.jump(BPF_JMP_JGT_K, hi, 1, 0)
        a.ret(SECCOMP_RET_ALLOW)
        a.goto(miss)
        return
    mid = len(ranges) // 2
    upper = f"ranges_{ranges[mid][0]}"
    a.jump(BPF_JMP_JGE_K, ranges[mid][0], upper, 0)
    _search(a, ranges[:mid], miss)
    a.label(upper)
    _search(a, ranges[mid:], miss)


def build_program(
    *,
    network: bool = False,
    memfds: bool = True,
    one_address_space: bool = False,
    machine: str | None = None,
    kill_action: int = SECCOMP_RET_KILL_PROCESS,
) -> tuple[bytes, list[str]]:
    """Assemble the filter. Returns ``(program_bytes, denied_names)``.

    Args:
        network: keep UDP sockets (DNS), netlink and new AF_UNIX sockets.
        memfds: allow memfd_create (without: EPERM, and results travel inline).
        one_address_space: refuse new processes (fork; clone without CLONE_VM), so RLIMIT_AS
            bounds everything the workload maps. Threads and vfork stay.

    Raises:
        OSError: no syscall table for this architecture.
    """
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"seccomp layer: no syscall table for {machine!r}")
    audit_arch, table, _ = _ARCHES[machine]
    denied = [name for name in DENIED_SYSCALLS if name in table]
    allowed = {table[name] for name in ALLOWED if name in table}

    a = _Asm()
    a.stmt(BPF_LD_W_ABS, OFF_ARCH)
    a.jump(BPF_JMP_JEQ_K, audit_arch, 1, 0)
    a.ret(kill_action)
    a.stmt(BPF_LD_W_ABS, OFF_NR)
    if audit_arch == AUDIT_ARCH_X86_64:
        a.jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1)
        a.ret(kill_action)
    _search(a, _ranges(allowed), "rest")

    a.label("rest")  # nr is in no allowed range
    a.jump(BPF_JMP_JEQ_K, table["clone3"], "enosys", 0)
    a.jump(BPF_JMP_JEQ_K, table["clone"], "clone", 0)
    if "fork" in table:
        a.jump(BPF_JMP_JEQ_K, table["fork"], "eperm" if one_address_space else "allow", 0)
    a.jump(BPF_JMP_JEQ_K, table["memfd_create"], "allow" if memfds else "eperm", 0)
    a.jump(BPF_JMP_JEQ_K, table["socket"], "socket", 0)
    a.jump(BPF_JMP_JEQ_K, table["setsockopt"], "setsockopt", 0)
    a.jump(BPF_JMP_JEQ_K, table["ioctl"], "ioctl", 0)
    a.jump(BPF_JMP_JEQ_K, table["fcntl"], "fcntl", 0)
    a.jump(BPF_JMP_JEQ_K, table["personality"], "personality", 0)
    for name in denied:
        a.jump(BPF_JMP_JEQ_K, table[name], "eperm", 0)
    for name in sorted(UNSUPPORTED):
        if name in table:
            a.jump(BPF_JMP_JEQ_K, table[name], "eopnotsupp", 0)
    a.ret(_errno(errno.ENOSYS))  # unknown to this table, or known and not listed: refused

    a.label("clone")  # the kernel reads only the low 32 bits of clone's flags
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(0))
    a.jump(BPF_JMP_JSET_K, CLONE_NS_FLAGS, "eperm", 0)
    if one_address_space:
        a.jump(BPF_JMP_JSET_K, CLONE_VM, "allow", "eperm")
    else:
        a.ret(SECCOMP_RET_ALLOW)

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

    a.label("setsockopt")  # setsockopt(int fd, int level, int optname, ...)
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(1))
    a.jump(BPF_JMP_JEQ_K, SOL_SOCKET, 0, "allow")
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(2))
    for option in SOCKET_BUFFER_OPTIONS:
        a.jump(BPF_JMP_JEQ_K, option, "eperm", 0)
    a.ret(SECCOMP_RET_ALLOW)

    a.label("ioctl")  # the request is an unsigned int: the low word
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(1))
    for request in (TIOCSTI, TIOCLINUX, FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS):
        a.jump(BPF_JMP_JEQ_K, request, "eperm", 0)
    a.jump(BPF_JMP_JEQ_K, FS_IOC_FSSETXATTR, "eperm", "allow")

    a.label("fcntl")
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(1))
    a.jump(BPF_JMP_JEQ_K, F_SETPIPE_SZ, "eperm", "allow")

    a.label("personality")
    a.stmt(BPF_LD_W_ABS, _off_arg_lo(0))
    a.jump(BPF_JMP_JEQ_K, PERSONALITY_QUERY, "allow", 0)
    a.jump(BPF_JMP_JEQ_K, 0, "allow", "eperm")  # PER_LINUX

    # Classic BPF jumps only forward: every target lives below its users.
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("eperm")
    a.ret(_errno(errno.EPERM))
    a.label("eopnotsupp")
    a.ret(_errno(errno.EOPNOTSUPP))
    a.label("enosys")
    a.ret(_errno(errno.ENOSYS))
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


@functools.lru_cache(maxsize=None)
def _kill_action() -> int:
    return SECCOMP_RET_KILL_PROCESS if action_available(SECCOMP_RET_KILL_PROCESS) else SECCOMP_RET_KILL_THREAD


@functools.lru_cache(maxsize=None)
def _program(network: bool, memfds: bool, one_address_space: bool, kill: int) -> tuple[bytes, list[str]]:
    # Cached: assembling takes milliseconds of Python, and a warm worker inherits the zygote's cache.
    return build_program(network=network, memfds=memfds, one_address_space=one_address_space, kill_action=kill)


def preload() -> None:
    """For the zygote: assemble the filters a worker most often installs (without network; with
    and without a memory cgroup), so a forked worker installs one without building it."""
    if supported():
        for one_space in (False, True):
            _program(False, not one_space, one_space, _kill_action())


def install(*, network: bool = False, memfds: bool = True, one_address_space: bool = False) -> dict[str, Any]:
    """Install the allow-list filter on every thread of this process.

    Args:
        network: keep UDP sockets (DNS), netlink and new AF_UNIX sockets; TCP is always allowed
            here and left to Landlock and the network namespace.
        memfds: allow memfd_create (the memory bound decides: ``limits.memory_plan``).
        one_address_space: refuse new processes, threads and vfork only.

    Returns:
        A dict: ``applied``, ``arch``, ``network``, ``denied`` (syscall names -> EPERM),
        ``unsupported`` (-> EOPNOTSUPP), ``newest_known`` (every later number -> ENOSYS),
        ``arg_checks`` (what is filtered by argument), ``kill`` (what kills the process),
        ``instructions`` (program length).

    Raises:
        OSError: unsupported architecture, or the kernel refused the filter.
    """
    kill = _kill_action()
    program, denied = _program(network, memfds, one_address_space, kill)
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
        "denied": list(denied),
        "unsupported": sorted(UNSUPPORTED),
        "newest_known": "%s (%d)" % newest_known(),
        "arg_checks": {
            "clone": "namespace flags -> EPERM" + ("; a new process (no CLONE_VM) -> EPERM" if one_address_space else ""),
            "clone3": "ENOSYS (glibc falls back to clone)",
            "fork": "EPERM" if one_address_space else "allowed",
            "memfd_create": "allowed" if memfds else "EPERM (results travel inline)",
            "socket": "AF_INET/6 SOCK_STREAM" + ("; AF_UNIX, SOCK_DGRAM, AF_NETLINK" if network else "")
            + "; other types EPERM, other domains EAFNOSUPPORT",
            "ioctl": "TIOCSTI, TIOCLINUX, FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR -> EPERM",
            "fcntl": "F_SETPIPE_SZ -> EPERM",
            "setsockopt": "SO_SNDBUF, SO_RCVBUF (and FORCE) -> EPERM",
            "personality": "only query / PER_LINUX",
        },
        "kill": ["foreign arch", "x32 ABI"] if platform.machine() in ("x86_64", "amd64") else ["foreign arch"],
        "kill_action": "KILL_PROCESS" if kill == SECCOMP_RET_KILL_PROCESS else "KILL_THREAD",
        "instructions": len(program) // 8,
    }
