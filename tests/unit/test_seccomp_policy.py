"""The seccomp allow-list as data: every call of both tables decided once, the program sound.

The filter's behaviour against the kernel is in tests/security (test_layers.py, test_metadata.py);
these check what can be checked without installing it: each name of each syscall table is in
exactly one of the lists, the numbers agree where the kernel numbers alike, and the assembled
program answers as the lists say (a tiny classic-BPF interpreter runs it on made-up calls).
"""

from __future__ import annotations

import errno
import struct

import pytest

from safehub._worker.sandbox import seccomp, syscall_table

LISTS = {
    "allowed": seccomp.ALLOWED,
    "arg_checked": seccomp.ARG_CHECKED,
    "denied": frozenset(seccomp.DENIED_SYSCALLS),
    "unsupported": seccomp.UNSUPPORTED,
    "left_out": seccomp.LEFT_OUT,
}
TABLES = {"x86_64": syscall_table.X86_64, "aarch64": syscall_table.AARCH64}


@pytest.mark.parametrize("machine", list(TABLES))
def test_every_call_of_the_table_is_decided_once(machine):
    table = TABLES[machine]
    for name in table:
        homes = [list_name for list_name, names in LISTS.items() if name in names]
        assert len(homes) == 1, f"{name} ({machine}) is in {homes or 'no list'}: decide it once"


def test_every_listed_name_is_a_real_call():
    known = set(syscall_table.X86_64) | set(syscall_table.AARCH64)
    for list_name, names in LISTS.items():
        assert names <= known, f"{list_name} names calls no table has: {sorted(names - known)}"


def test_the_metadata_family_is_refused():
    family = {"chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "setxattr",
              "lsetxattr", "fsetxattr", "setxattrat", "removexattr", "lremovexattr", "fremovexattr", "removexattrat",
              "utime", "utimes", "futimesat", "utimensat", "file_setattr"}
    assert family <= set(seccomp.DENIED_SYSCALLS)
    reads = {"getxattr", "lgetxattr", "fgetxattr", "getxattrat", "listxattr", "llistxattr", "flistxattr",
             "listxattrat", "file_getattr"}
    assert reads <= seccomp.UNSUPPORTED


def test_the_newest_calls_are_numbered_alike_on_both_arches():
    for name, number in syscall_table.X86_64.items():
        if number >= 424 and name in syscall_table.AARCH64:
            assert syscall_table.AARCH64[name] == number, name
    name, number = seccomp.newest_known()
    assert max(syscall_table.X86_64.values()) == max(syscall_table.AARCH64.values()) == number
    assert syscall_table.X86_64[name] == number


def _run(program: bytes, arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """Classic BPF as the kernel runs it on a seccomp_data, for the instructions the filter uses."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    code = [struct.unpack_from("=HBBI", program, 8 * i) for i in range(len(program) // 8)]
    acc, pc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif op == seccomp.BPF_ALU_AND_K:
            acc &= k
        elif op == seccomp.BPF_RET_K:
            return k
        elif op == seccomp.BPF_JMP_JA:
            pc += k
        else:
            taken = {seccomp.BPF_JMP_JEQ_K: acc == k, seccomp.BPF_JMP_JGT_K: acc > k,
                     seccomp.BPF_JMP_JGE_K: acc >= k, seccomp.BPF_JMP_JSET_K: bool(acc & k)}[op]
            pc += jt if taken else jf


ERRNO = seccomp.SECCOMP_RET_ERRNO


@pytest.mark.parametrize("machine", list(TABLES))
def test_the_program_answers_as_the_lists_say(machine):
    arch, table, _ = seccomp._ARCHES[machine]
    program, _ = seccomp.build_program(machine=machine)
    for name, number in table.items():
        answer = _run(program, arch, number)
        if name in seccomp.ALLOWED:
            assert answer == seccomp.SECCOMP_RET_ALLOW, name
        elif name in seccomp.DENIED_SYSCALLS:
            assert answer == ERRNO | errno.EPERM, name
        elif name in seccomp.UNSUPPORTED:
            assert answer == ERRNO | errno.EOPNOTSUPP, name
        elif name in seccomp.LEFT_OUT:
            assert answer == ERRNO | errno.ENOSYS, name
    for number in range(max(table.values()) + 1, max(table.values()) + 64):
        assert _run(program, arch, number) == ERRNO | errno.ENOSYS, number
    assert _run(program, arch ^ 1, table["read"]) == seccomp.SECCOMP_RET_KILL_PROCESS


def test_the_memory_bound_switches_fork_and_memfds():
    arch, table, _ = seccomp._ARCHES["x86_64"]
    open_program, _ = seccomp.build_program(machine="x86_64")
    one_space, _ = seccomp.build_program(machine="x86_64", memfds=False, one_address_space=True)
    thread_flags = 0x3D0F00  # CLONE_VM | FS | FILES | SIGHAND | THREAD | SYSVSEM | SETTLS | *TID
    fork_flags = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
    for program, fork_answer, memfd_answer in ((open_program, seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_ALLOW),
                                               (one_space, ERRNO | errno.EPERM, ERRNO | errno.EPERM)):
        assert _run(program, arch, table["clone"], (thread_flags,)) == seccomp.SECCOMP_RET_ALLOW
        assert _run(program, arch, table["clone"], (fork_flags,)) == fork_answer
        assert _run(program, arch, table["fork"]) == fork_answer
        assert _run(program, arch, table["vfork"]) == seccomp.SECCOMP_RET_ALLOW
        assert _run(program, arch, table["memfd_create"]) == memfd_answer
        assert _run(program, arch, table["clone"], (0x10000000 | 17,)) == ERRNO | errno.EPERM  # CLONE_NEWUSER
        assert _run(program, arch, table["read"] | seccomp.X32_SYSCALL_BIT) == seccomp.SECCOMP_RET_KILL_PROCESS
