"""What the command says is true (issue 20): real ``safehub`` subprocesses, stderr a pipe, a
umask, a tiny full tmpfs in a private mount namespace, the loopback GitHub emulator.

Each test drives the command as a user would and checks what a user sees: the output file and its
mode, the lines on stderr, the exit code, the words of the one error line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safehub import cli
from tests.integration.test_cli import assert_error, assert_ok, safehub_cli

pytestmark = pytest.mark.timeout(300)

HUBCONF = '''
dependencies = ["torch"]

import os

import torch
from torch.hub import load_state_dict_from_url


class Encoder(torch.nn.Module):
    """An encoder with a config value."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.width = 2
        self.names = ["a", "b"]

    def forward(self, x, scale=1.0):
        return self.linear(x) * scale


def encoder():
    """An encoder.

    Args:
        none: it takes none.
    """
    torch.manual_seed(0)
    return Encoder()


def linear(url=None, progress=True):
    """A linear layer, with weights from url."""
    model = torch.nn.Linear(4, 3)
    if url:
        model.load_state_dict(load_state_dict_from_url(url, progress=progress))
    return model


def with_transform():
    """A model and its preprocessing, as some hub repositories return."""
    return Encoder(), lambda x: x


def wide():
    return torch.nn.Linear(256, 256)


def allocate(gib=64):
    return torch.empty(int(gib * 2**30), dtype=torch.uint8)


def open_files(count=400):
    return [open(os.devnull) for _ in range(count)]


def spin():
    while True:
        pass


def write_big(mib=4):
    with open("big.bin", "wb") as f:
        f.write(b"x" * (mib << 20))
'''

MISSING_DEPS = 'dependencies = ["torch", "PIL", "surely_not_installed_pkg"]\n\ndef net():\n    return 1\n'


@pytest.fixture
def repo(make_repo):
    return make_repo("acme", "models", {"hubconf.py": HUBCONF})


@pytest.fixture
def checkpoint(github):
    state = {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.tensor([1.0, 2.0, 3.0])}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return github.add_file(f"linear-{hashlib.sha256(data).hexdigest()[:8]}.pth", data), state


def cli_with_umask(umask: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safehub", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=240, preexec_fn=lambda: os.umask(umask))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- output and options ----------------------------------------------------------------------------


def test_quiet_means_no_progress_frames_and_no_worker_download_line(repo, checkpoint, hub_dir, tmp_path):
    url, state = checkpoint
    out = str(tmp_path / "w.safetensors")
    proc = assert_ok(safehub_cli("-q", "load", "acme/models", "linear", "--arg", f"url={url}", "-o", out))
    assert proc.stderr == "", proc.stderr  # stderr is a pipe: no bar, and -q: no line at all
    assert (hub_dir / "checkpoints" / url.rsplit("/", 1)[1]).is_file()

    # Not quiet, and the file cached: the parent says so; torch.hub's line about the view's path is gone.
    proc = assert_ok(safehub_cli("load", "acme/models", "linear", "--arg", f"url={url}", "-o", out))
    assert "Using the cached file" in proc.stderr and url in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr and "views" not in proc.stderr and "[worker] Downloading" not in proc.stderr


def test_not_quiet_the_download_is_named_once_by_the_parent(repo, checkpoint, hub_dir, tmp_path):
    url, _ = checkpoint
    proc = assert_ok(safehub_cli("load", "acme/models", "linear", "--arg", f"url={url}", "--arg", "progress=true",
                                 "-o", str(tmp_path / "w.pt")))
    cached = hub_dir / "checkpoints" / url.rsplit("/", 1)[1]
    assert f'Downloading: "{url}" to {cached}' in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr and "[worker]" not in proc.stderr, proc.stderr


def test_global_options_before_or_after_every_command(repo, tmp_path):
    proc = assert_ok(safehub_cli("--json", "help", "acme/models", "encoder"))
    assert json.loads(proc.stdout)["model"] == "encoder"
    proc = assert_ok(safehub_cli("--json", "cache", "list"))
    assert [e["repo"] for e in json.loads(proc.stdout)["entries"]] == ["models"]
    proc = assert_ok(safehub_cli("cache", "list", "--json"))
    assert json.loads(proc.stdout)["entries"]
    torch.save({"0": torch.ones(1, 2)}, tmp_path / "x.pt")
    proc = assert_ok(safehub_cli("--json", "--quiet", "run", "acme/models", "encoder", "--input", str(tmp_path / "x.pt"),
                                 "-o", str(tmp_path / "y.safetensors")))
    assert json.loads(proc.stdout)["tensors"]["output"]["shape"] == [1, 2]
    proc = assert_ok(safehub_cli("--json", "trust", "list"))
    assert json.loads(proc.stdout)["entries"] == []


def test_help_is_dedented_like_cleandoc(repo):
    import inspect

    proc = assert_ok(safehub_cli("help", "acme/models", "encoder"))
    assert proc.stdout == "An encoder.\n\nArgs:\n    none: it takes none.\n"
    assert proc.stdout.rstrip("\n") == inspect.cleandoc(proc.stdout)


def test_no_isolate_writes_the_state_dict_itself(repo, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    proc = assert_ok(safehub_cli("load", "acme/models", "encoder", "--no-isolate", "--trust", "-o", str(out)))
    assert "isolate=True" not in proc.stderr
    assert sorted(load_file(out)) == ["linear.bias", "linear.weight"]


def test_the_extension_says_the_format(repo, tmp_path):
    from safetensors.torch import load_file

    pt = tmp_path / "w.pt"
    assert_ok(safehub_cli("load", "acme/models", "encoder", "-o", str(pt)))
    state = torch.load(pt, weights_only=True)  # torch.save of the state dict: data, no pickle of code
    assert sorted(state) == ["linear.bias", "linear.weight"]
    st = tmp_path / "w.safetensors"
    assert_ok(safehub_cli("load", "acme/models", "encoder", "-o", str(st)))
    assert torch.equal(load_file(st)["linear.weight"], state["linear.weight"])

    assert_error(safehub_cli("load", "acme/models", "encoder", "-o", str(tmp_path / "w.bin")), cli.EXIT_USAGE,
                 ".safetensors", ".pt")
    assert_error(safehub_cli("load", "acme/models", "encoder", "--returns", "object", "--trust",
                             "-o", str(tmp_path / "o.safetensors")), cli.EXIT_USAGE, "Name the file .pt")
    proc = assert_ok(safehub_cli("load", "acme/models", "encoder", "--returns", "object", "--trust", "-o", str(tmp_path / "o.pt")))
    assert "Wrote an Encoder object" in proc.stdout
    assert not list(tmp_path.glob(".*tmp")) and not (tmp_path / "w.bin").exists()


def test_output_files_honour_the_umask_and_an_existing_files_mode(repo, tmp_path):
    out = tmp_path / "w.safetensors"
    assert_ok(cli_with_umask(0o022, "load", "acme/models", "encoder", "-o", str(out)))
    assert mode(out) == 0o644
    out.unlink()
    assert_ok(cli_with_umask(0o077, "load", "acme/models", "encoder", "-o", str(out)))
    assert mode(out) == 0o600
    out.chmod(0o640)  # overwriting keeps the file's mode, as a shell's > does
    assert_ok(cli_with_umask(0o022, "load", "acme/models", "encoder", "-o", str(out)))
    assert mode(out) == 0o640
    pt = tmp_path / "o.pt"
    assert_ok(cli_with_umask(0o002, "load", "acme/models", "encoder", "--returns", "object", "--trust", "-o", str(pt)))
    assert mode(pt) == 0o664


def test_sandbox_settings_are_options_too(repo, tmp_path):
    # --network and --allow-host exist and reach the Sandbox: a bad host is a usage error naming them.
    assert_error(safehub_cli("load", "acme/models", "encoder", "--allow-host", "not a host!", "-o", str(tmp_path / "w.pt")),
                 cli.EXIT_USAGE, "--allow-host")
    assert_ok(safehub_cli("load", "acme/models", "encoder", "--network", "--allow-host", "models.internal:8080",
                          "--max-open-files", "128", "--cpu-time", "60", "-o", str(tmp_path / "w.pt")))
    assert_error(safehub_cli("list", "acme/models", "--no-isolate", "--network"), cli.EXIT_USAGE, "--network")


# -- errors that blame the right thing -------------------------------------------------------------


def test_the_memory_limit_is_named_not_blamed_on_the_repository(repo, tmp_path):
    out = str(tmp_path / "w.pt")
    # An allocation the limit refuses: torch's "can't allocate memory", from the entrypoint.
    line = assert_error(safehub_cli("load", "acme/models", "allocate", "--memory-limit", "2G", "-o", out),
                        cli.EXIT_ERROR, "memory limit of 2 GiB", "--memory-limit")
    assert "not a fault of the repository" in line and "Sandbox(" not in line
    # A limit so small that torch's own library cannot be mapped while hubconf.py imports it.
    line = assert_error(safehub_cli("load", "acme/models", "encoder", "--memory-limit", "64M", "-o", out),
                        cli.EXIT_ERROR, "memory limit of 64 MiB", "--memory-limit")


def test_the_memory_limit_in_python_names_the_sandbox_setting(repo):
    import safehub
    from safehub.errors import SandboxLimitError

    with pytest.raises(SandboxLimitError, match=r"memory limit of 2 GiB .* Sandbox\(memory_limit=\.\.\.\)") as info:
        safehub.load("acme/models", "allocate", isolate=safehub.Sandbox(memory_limit=2 << 30), returns="weights")
    assert info.value.limit == "memory_limit" and info.value.value == 2 << 30 and info.value.remote_traceback


@pytest.mark.parametrize(("entrypoint", "options", "words"), [
    ("open_files", ["--max-open-files", "64"], ["limit on open files of 64", "--max-open-files"]),
    ("write_big", ["--max-file-size", "1M"], ["file of 1 MiB", "--max-file-size"]),
    ("spin", ["--cpu-time", "1"], ["CPU time limit of 1 s", "--cpu-time"]),
])
def test_the_other_limits_are_named_with_their_option(repo, tmp_path, entrypoint, options, words):
    assert_error(safehub_cli("load", "acme/models", entrypoint, *options, "-o", str(tmp_path / "w.pt")),
                 cli.EXIT_ERROR, *words)


def test_offline_a_missing_checkpoint_exits_4_like_a_missing_repository(repo, checkpoint, tmp_path):
    url, _ = checkpoint
    out = str(tmp_path / "w.pt")
    assert_ok(safehub_cli("load", "acme/models", "encoder", "-o", out))  # the repository is cached
    assert_error(safehub_cli("--offline", "load", "acme/models", "linear", "--arg", f"url={url}", "-o", out),
                 cli.EXIT_NETWORK, "not in the cache", url)
    assert_error(safehub_cli("--offline", "list", "acme/other"), cli.EXIT_NETWORK, "not in the cache")


def test_missing_dependencies_give_the_pip_line(make_repo):
    make_repo("acme", "deps", {"hubconf.py": MISSING_DEPS})
    assert_error(safehub_cli("help", "acme/deps", "net"), cli.EXIT_ERROR,
                 "Missing dependencies: PIL, surely_not_installed_pkg", "pip install pillow surely_not_installed_pkg")


def test_an_entrypoint_typo_gets_did_you_mean(repo, tmp_path):
    assert_error(safehub_cli("load", "acme/models", "encodr", "-o", str(tmp_path / "w.pt")), cli.EXIT_ERROR,
                 "did you mean 'encoder'", "safehub list acme/models")
    assert_error(safehub_cli("help", "acme/models", "encodr", "--no-isolate", "--trust"), cli.EXIT_ERROR,
                 "did you mean 'encoder'")


def test_a_damaged_cached_tree_names_the_cache_and_force_reload(make_repo, tmp_path):
    import safehub
    from safehub import _cache

    make_repo("acme", "split", {"hubconf.py": "from netlib import build as net\n", "netlib.py": "def build():\n    return 1\n"})
    assert_ok(safehub_cli("list", "acme/split"))
    [entry] = [e for e in _cache.iter_records() if e.repo == "split"]
    (entry.repo_dir / "netlib.py").unlink()  # a damaged cache: a file gone since it was fetched
    line = assert_error(safehub_cli("list", "acme/split"), cli.EXIT_INTEGRITY, str(entry.repo_dir), "--force-reload",
                        "No module named 'netlib'")
    assert "force_reload=True" not in line
    with pytest.raises(safehub.errors.DamagedCacheError, match="force_reload=True"):
        safehub.list("acme/split", isolate=True)
    assert_ok(safehub_cli("list", "acme/split", "--force-reload"))


def _full_tmpfs_argv(mountpoint: Path, size: str, command: list[str]) -> list[str]:
    """``command`` run in a private mount namespace where ``mountpoint`` is a tmpfs of ``size``."""
    mount = f"mount -t tmpfs -o size={size} tmpfs {mountpoint} && exec \"$@\""
    flags = ["-m"] if os.geteuid() == 0 else ["-Urm"]
    return ["unshare", *flags, "sh", "-c", mount, "sh", *command]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_full_hub_dir_is_a_disk_error_naming_the_folder(make_repo, tmp_path):
    big = os.urandom(512 * 1024).hex()  # incompressible: the archive outgrows the tmpfs
    make_repo("acme", "big", {"hubconf.py": "def net():\n    return 1\n", "data.txt": big})
    tiny = tmp_path / "tiny-hub"
    tiny.mkdir()
    argv = _full_tmpfs_argv(tiny, "256k", [sys.executable, "-m", "safehub", "--hub-dir", str(tiny), "list", "acme/big"])
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240)
    line = assert_error(proc, cli.EXIT_ERROR, "No space left on device", str(tiny), "--hub-dir")
    assert "connection" not in line


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_an_output_file_on_a_full_disk_names_the_folder(repo, tmp_path):
    tiny = tmp_path / "tiny-out"
    tiny.mkdir()
    assert_ok(safehub_cli("list", "acme/models"))  # cached outside the namespace
    # In-process (--no-isolate): a worker could not start inside an unprivileged user's namespace,
    # and the write of the output is what this test is about.
    argv = _full_tmpfs_argv(tiny, "64k", [sys.executable, "-m", "safehub", "load", "acme/models", "wide",
                                          "--no-isolate", "--trust", "-o", str(tiny / "w.safetensors")])
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240)
    assert_error(proc, cli.EXIT_ERROR, "No space left on device", str(tiny))


# -- remote models from the command line and in Python ---------------------------------------------


def test_run_takes_call_arguments_and_pt_and_npy_inputs(repo, tmp_path):
    import numpy
    from safetensors.torch import load_file

    x = torch.ones(1, 2)
    torch.save({"0": x}, tmp_path / "x.pt")
    numpy.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        torch.manual_seed(0)
        expected = torch.nn.Linear(2, 2)(x) * 3.0
    for source in ("x.pt", "x.npy"):
        out = tmp_path / f"y-{source}.safetensors"
        assert_ok(safehub_cli("run", "acme/models", "encoder", "--input", str(tmp_path / source),
                              "--call-arg", "scale=3", "-o", str(out)))
        assert torch.allclose(load_file(out)["output"], expected)
    out = tmp_path / "y.pt"
    assert_ok(safehub_cli("run", "acme/models", "encoder", "--input", str(tmp_path / "x.pt"), "--call-arg", "scale=3",
                          "-o", str(out)))
    assert torch.allclose(torch.load(out, weights_only=True)["output"], expected)
    # A .pt input is data: a pickle that would run code is refused, before any worker starts.
    torch.save({"0": x, "evil": Path("/")}, tmp_path / "evil.pt")
    assert_error(safehub_cli("run", "acme/models", "encoder", "--input", str(tmp_path / "evil.pt"), "-o", str(out)),
                 cli.EXIT_ERROR, "weights_only=True")


def test_a_remote_module_reads_attributes_and_returns_itself(repo):
    import safehub

    with safehub.load("acme/models", "encoder", isolate=True, returns="remote") as m:
        assert m.training is True and m.width == 2 and m.names == ["a", "b"]
        assert m.eval() is m and m.training is False
        assert m.to("cpu") is m and m.float() is m
        state = m.state_dict()
        named = dict(m.named_parameters())
        assert sorted(named) == ["linear.bias", "linear.weight"]
        assert all(torch.equal(named[k], state[k]) for k in named)
        assert [p.shape for p in m.parameters()] == [torch.Size([2, 2]), torch.Size([2])]
        with pytest.raises(AttributeError, match="no public method or attribute 'nope'"):
            m.nope  # noqa: B018
        assert not hasattr(m, "nope")
        with pytest.raises(safehub.errors.RemoteError, match=r"^the remote model raised RuntimeError"):
            m(torch.ones(1, 5))


def test_a_tuple_of_model_and_preprocess_gives_a_clear_error(repo):
    import safehub

    with pytest.raises(safehub.errors.ResultDecodeError, match=r"returned a tuple \(Encoder, function\).*one model"):
        safehub.load("acme/models", "with_transform", isolate=True, returns="remote")


def test_a_remote_timeout_says_what_timed_out(repo):
    import safehub

    with safehub.load("acme/models", "encoder", isolate=safehub.Sandbox(timeout=60), returns="remote") as m:
        gone = m.call("forward", torch.ones(1, 2))
        assert gone.shape == (1, 2)
    with pytest.raises(safehub.errors.RemoteClosedError, match="closed"):
        m(torch.ones(1, 2))


# -- doctor where user namespaces are refused ------------------------------------------------------

# A seccomp filter that refuses every new user namespace (unshare and clone with CLONE_NEWUSER;
# clone3 as unimplemented, as Docker's profile does, so libc falls back to clone), applied to the
# doctor's process before it starts: the kernel itself refuses, nothing in safehub is faked.
REFUSE_USERNS = r'''
import ctypes, errno, os, platform, struct, sys
ARCH, NR = {"x86_64": (0xC000003E, (272, 56, 435)), "aarch64": (0xC00000B7, (97, 220, 435))}[platform.machine()]
unshare, clone, clone3 = NR
CLONE_NEWUSER = 0x10000000
refuse = 0x00050000 | int(sys.argv[1])  # SECCOMP_RET_ERRNO | errno
def ins(code, jt, jf, k): return struct.pack("HBBI", code, jt, jf, k)
prog = [
    ins(0x20, 0, 0, 4), ins(0x15, 1, 0, ARCH), ins(0x06, 0, 0, 0x7FFF0000),  # arch, else allow
    ins(0x20, 0, 0, 0),                                                       # nr
    ins(0x15, 4, 0, unshare), ins(0x15, 3, 0, clone), ins(0x15, 0, 1, clone3),
    ins(0x06, 0, 0, 0x00050000 | errno.ENOSYS), ins(0x06, 0, 0, 0x7FFF0000),
    ins(0x20, 0, 0, 16), ins(0x45, 0, 1, CLONE_NEWUSER),                      # args[0] & CLONE_NEWUSER
    ins(0x06, 0, 0, refuse), ins(0x06, 0, 0, 0x7FFF0000),
]
buf = ctypes.create_string_buffer(b"".join(prog))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(len(prog), ctypes.addressof(buf))), 0, 0) == 0, ctypes.get_errno()
os.execv(sys.executable, [sys.executable, "-m", "safehub", *sys.argv[2:]])
'''


@pytest.mark.parametrize("refusal", ["ENOSPC", "EPERM"])
def test_doctor_where_user_namespaces_are_refused(tmp_path, refusal):
    import errno

    hub = tmp_path / "hub"
    hub.mkdir()
    hub.chmod(0o777)
    env = {**os.environ, "HOME": str(tmp_path), "TORCH_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", REFUSE_USERNS, str(getattr(errno, refusal)), "--hub-dir", str(hub), "doctor"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240, env=env)
    text = assert_ok(proc).stdout
    layers = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and len(line.split()) > 1}
    assert "disabled or restricted" in layers["namespaces"], text
    assert "user namespaces:" in text and "still active:" in text and "apparmor_restrict_unprivileged_userns" in text
    if os.geteuid() == 0:
        # Root needs no user namespace for the others: they hold, and so does the sized scratch tmpfs.
        assert "as root only" in layers["namespaces"] and "nothing is lost" in text, text
        assert "sized tmpfs" in layers["rlimits"], text
    else:
        assert "MISSING" in layers["namespaces"] and "no network, ipc, pid or mount namespace" in text, text
        assert "sized tmpfs" not in layers["rlimits"] and "scratch a plain folder" in layers["rlimits"], text
    for layer in ("landlock", "seccomp", "rlimits"):
        assert "active" in layers[layer], text
    proc = subprocess.run([sys.executable, "-c", REFUSE_USERNS, str(getattr(errno, refusal)), "--hub-dir", str(hub),
                           "doctor", "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240, env=env)
    report = json.loads(assert_ok(proc).stdout)
    assert report["user_namespaces"]["restricted"] is True and "landlock" in report["user_namespaces"]["still_active"]
