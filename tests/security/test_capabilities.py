"""A worker keeps no capability, not even those of the user namespace it made for itself.

``unshare(CLONE_NEWUSER)`` gives the process every capability of the new namespace, and the
worker never execs (which would clear them): without ``capabilities.drop_all`` the repository's
code ran with a full CapEff over its own mount, network and uts namespaces. Each test runs the
attack from the repository's code, on the cold and the warm path, as the entrypoint and as a
remote model's method: the status lines must show every set empty, and bringing the network
namespace's loopback up (CAP_NET_ADMIN there) must be refused.
"""

from __future__ import annotations

import errno

import pytest

from safehub._run import run_isolated
from safehub._sandbox import Sandbox
from tests.local_repos import write_repo

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("worker_start")]

PROBE = '''
    import ctypes
    import fcntl
    import socket
    import struct

    dependencies = []
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


    def probe():
        caps = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")):
                    name, value = line.split()
                    caps[name.rstrip(":")] = int(value, 16)
        result = {"caps": caps}
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # a TCP socket: the one kind seccomp allows
        try:
            req = bytearray(struct.pack("16sH", b"lo", 0) + bytes(22))
            fcntl.ioctl(s, SIOCGIFFLAGS, req)
            flags = struct.unpack_from("H", req, 16)[0]
            struct.pack_into("H", req, 16, flags | IFF_UP)
            fcntl.ioctl(s, SIOCSIFFLAGS, req)  # needs CAP_NET_ADMIN over the network namespace
            result["lo_up"] = 0
        except OSError as exc:
            result["lo_up"] = exc.errno
        finally:
            s.close()
        libc = ctypes.CDLL(None, use_errno=True)
        result["sethostname"] = 0 if libc.sethostname(b"pwned", 5) == 0 else ctypes.get_errno()
        return result


    class Model:
        def forward(self):
            return probe()

        def __call__(self):
            return self.forward()


    def model():
        return Model()
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_repo(tmp_path_factory.mktemp("caps") / "repo", {"hubconf.py": PROBE})


def _assert_powerless(result):
    assert result["caps"] and set(result["caps"]) >= {"CapEff", "CapPrm", "CapBnd", "CapInh"}, result
    assert all(value == 0 for value in result["caps"].values()), result
    assert result["lo_up"] in (errno.EPERM, errno.EACCES), result  # refused, not done
    assert result["sethostname"] in (errno.EPERM, errno.EACCES), result


def test_the_repositorys_code_holds_no_capability(repo):
    _assert_powerless(run_isolated(repo, "load", model="probe", returns="object", sandbox=Sandbox(timeout=60)))


def test_a_remote_model_holds_no_capability(repo):
    with run_isolated(repo, "load", model="model", returns="remote", sandbox=Sandbox(timeout=60)) as handle:
        _assert_powerless(handle())
