"""The seccomp layer refuses every change to a file's metadata: one test per system call.

Landlock (up to ABI 7) governs none of these, so without seccomp a worker could make its user's
key world-readable (chmod, a POSIX ACL written as ``system.posix_acl_access``), hand a file to
another owner, tag or strip extended attributes, set chattr flags, or re-date a file. Each test
runs a fresh child interpreter that makes the call through its raw system-call number (so the
kernel, not Python, must refuse it) twice: first on a practice file with no filter, which must
work (the attack is real on this kernel), then, with the worker's filter installed, on the
canary, which must be refused and stay exactly as it was (mode, owner, extended attributes and
ACL, chattr flags, mtime and ctime). The canary is the user's own file, and as root also one
owned by uid 65534: the uid drop makes the worker that uid, so only the filter protects it.

Reading extended attributes is refused as a filesystem without them (EOPNOTSUPP), and a number
newer than the filter's table is refused (ENOSYS) whatever the kernel has behind it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from tests.security.test_layers import IS_ROOT, NOBODY, _load, denied, require, run_child

pytestmark = pytest.mark.timeout(120)

FS_IOC_GETFLAGS = 0x80086601

# name -> Python run in the child: ``call(path)`` makes one metadata change through a raw number
# (NR: the filter's own table; the numbers since Linux 6.13 are the same on both arches).
CALLS = {
    "chmod": "sys_call(NR['chmod'], path, 0o666)",
    "fchmod": "sys_call(NR['fchmod'], opened(path), 0o666)",
    "fchmodat": "sys_call(NR['fchmodat'], AT_FDCWD, path, 0o666)",
    "fchmodat2": "sys_call(452, AT_FDCWD, path, 0o666, 0)",
    "fchmodat2_o_path": "sys_call(452, os.open(path, O_PATH), b'', 0o666, AT_EMPTY_PATH)",
    "chown": "sys_call(NR['chown'], path, -1, os.getgid())",
    "fchown": "sys_call(NR['fchown'], opened(path), -1, os.getgid())",
    "lchown": "sys_call(NR['lchown'], path, -1, os.getgid())",
    "fchownat": "sys_call(NR['fchownat'], AT_FDCWD, path, -1, os.getgid(), 0)",
    "setxattr": "sys_call(NR['setxattr'], path, b'user.attack', b'1', 1, 0)",
    "lsetxattr": "sys_call(NR['lsetxattr'], path, b'user.attack', b'1', 1, 0)",
    "fsetxattr": "sys_call(NR['fsetxattr'], opened(path), b'user.attack', b'1', 1, 0)",
    "setxattrat": "sys_call(463, AT_FDCWD, path, 0, b'user.attack', xattr_args(b'1'), 16)",
    "posix_acl_access": "sys_call(NR['setxattr'], path, b'system.posix_acl_access', ACL, len(ACL), 0)",
    "posix_acl_setxattrat": "sys_call(463, AT_FDCWD, path, 0, b'system.posix_acl_access', xattr_args(ACL), 16)",
    "removexattr": "sys_call(NR['removexattr'], path, b'user.tag')",
    "lremovexattr": "sys_call(NR['lremovexattr'], path, b'user.tag')",
    "fremovexattr": "sys_call(NR['fremovexattr'], opened(path), b'user.tag')",
    "removexattrat": "sys_call(466, AT_FDCWD, path, 0, b'user.tag')",
    "utime": "sys_call(NR['utime'], path, OLD_UTIMBUF)",
    "utimes": "sys_call(NR['utimes'], path, OLD_TIMEVALS)",
    "futimesat": "sys_call(NR['futimesat'], AT_FDCWD, path, OLD_TIMEVALS)",
    "utimensat": "sys_call(NR['utimensat'], AT_FDCWD, path, OLD_TIMESPECS, 0)",
    "futimens": "sys_call(NR['utimensat'], opened(path), None, OLD_TIMESPECS, 0)",
    "file_setattr": "sys_call(469, AT_FDCWD, path, FILE_ATTR_NODUMP, 24, 0)",
    "fs_ioc_setflags": "fcntl.ioctl(opened(path), FS_IOC_SETFLAGS, struct.pack('l', FS_NODUMP_FL))",
}

# Reading calls: refused as a filesystem without extended attributes would.
READS = {
    "getxattr": "sys_call(NR['getxattr'], path, b'user.tag', BUF, 64)",
    "lgetxattr": "sys_call(NR['lgetxattr'], path, b'user.tag', BUF, 64)",
    "fgetxattr": "sys_call(NR['fgetxattr'], opened(path), b'user.tag', BUF, 64)",
    "getxattrat": "sys_call(464, AT_FDCWD, path, 0, b'user.tag', xattr_args(BUF, 64), 16)",
    "listxattr": "sys_call(NR['listxattr'], path, BUF, 64)",
    "llistxattr": "sys_call(NR['llistxattr'], path, BUF, 64)",
    "flistxattr": "sys_call(NR['flistxattr'], opened(path), BUF, 64)",
    "listxattrat": "sys_call(465, AT_FDCWD, path, 0, BUF, 64)",
    "file_getattr": "sys_call(468, AT_FDCWD, path, ctypes.create_string_buffer(24), 24, 0)",
}

CHILD = r"""
import fcntl, struct
sc = load("seccomp")
import platform
NR = sc._ARCHES[platform.machine()][1]
AT_FDCWD, AT_EMPTY_PATH, O_PATH = -100, 0x1000, 0o10000000
FS_IOC_SETFLAGS, FS_NODUMP_FL = 0x40086602, 0x40
# A POSIX ACL that gives everyone read and write: user::rw- group::r-- other::rw-
ACL = struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0xFFFFFFFF) + struct.pack("<HHI", 4, 4, 0xFFFFFFFF) + struct.pack("<HHI", 0x20, 6, 0xFFFFFFFF)
OLD_UTIMBUF = struct.pack("qq", 978307200, 978307200)  # 2001-01-01
OLD_TIMEVALS = struct.pack("qqqq", 978307200, 0, 978307200, 0)
OLD_TIMESPECS = struct.pack("qqqq", 978307200, 0, 978307200, 0)
FILE_ATTR_NODUMP = struct.pack("QIIII", 0x80, 0, 0, 0, 0)  # FS_XFLAG_NODUMP
BUF = ctypes.create_string_buffer(64)
def sys_call(nr, *args, _call=sys_call):
    # Every int a full register (ctypes passes a bare int as a C int: the upper half is garbage).
    return _call(nr, *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
KEEP = []
def xattr_args(value, size=None):  # struct xattr_args { u64 value; u32 size; u32 flags; }
    buf = value if isinstance(value, ctypes.Array) else ctypes.create_string_buffer(value, len(value))
    KEEP.append(buf)
    return struct.pack("QII", ctypes.addressof(buf), len(value) if size is None else size, 0)
def opened(path):
    return os.open(path, os.O_RDONLY)
def call(path):
    assert isinstance(path, bytes)  # ctypes passes a str as wchar_t *: "/" to the kernel
    return CALL
before = attempt(lambda: call(os.fsencode(ARGS["practice"])))
sc.install()
report(before=before, after=attempt(lambda: call(os.fsencode(ARGS["canary"]))), later=attempt(lambda: sys_call(470, 0, 0, 0, 0)))
"""


def _canary(folder, name: str, owner: int | None):
    path = folder / name
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot yours\n")
    path.chmod(0o600)
    os.setxattr(path, "user.tag", b"the user's own tag")
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def _state(path) -> dict:
    """Everything a metadata change could touch."""
    st = os.stat(path)
    attrs = {name: os.getxattr(path, name) for name in os.listxattr(path)}
    with open(path, "rb") as f:
        flags = fcntl.ioctl(f.fileno(), FS_IOC_GETFLAGS, struct.pack("l", 0))
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns,
            "ctime": st.st_ctime_ns, "xattrs": attrs, "flags": flags}


OWNERS = ["user"] + (["nobody"] if IS_ROOT else [])


@pytest.fixture
def files():
    """make(owner) -> (practice, canary), in a folder every uid can traverse (not tmp_path's)."""
    folder = Path(tempfile.mkdtemp(prefix="safehub-meta-", dir="/tmp"))
    folder.chmod(0o755)

    def make(owner: str):
        uid = NOBODY if owner == "nobody" else None
        return _canary(folder, "practice", uid), _canary(folder, "canary", uid)

    yield make
    shutil.rmtree(folder, ignore_errors=True)


def _run(code: str, practice, canary):
    if code.startswith("sys_call(NR['") and code[len("sys_call(NR['"):].split("'")[0] not in _load("seccomp")._ARCHES[platform.machine()][1]:
        pytest.skip(f"no such call on {platform.machine()}")
    child = run_child(CHILD.replace("return CALL", "return " + code), {"practice": str(practice), "canary": str(canary)})
    assert child.returncode == 0, child
    return child


@pytest.mark.parametrize("owner", OWNERS)
@pytest.mark.parametrize("name", list(CALLS))
def test_metadata_change_is_refused_by_the_kernel(name, owner, files):
    require("seccomp")
    practice, canary = files(owner)
    before, practice_before = _state(canary), _state(practice)
    child = _run(CALLS[name], practice, canary)
    assert child["before"]["ok"], f"{name} does not work here even without the filter, so it proves nothing: {child}"
    assert _state(practice) != practice_before, f"{name} changed nothing even without the filter: {child}"
    assert denied(child["after"], errno.EPERM), child
    assert _state(canary) == before, f"{name} changed the canary through the filter"
    assert denied(child["later"], errno.ENOSYS), child  # a number newer than the table


@pytest.mark.parametrize("name", list(READS))
def test_reading_extended_attributes_is_answered_as_unsupported(name, files):
    require("seccomp")
    practice, canary = files("user")
    child = _run(READS[name], practice, canary)
    assert child["before"]["ok"], child
    assert denied(child["after"], errno.EOPNOTSUPP), child
