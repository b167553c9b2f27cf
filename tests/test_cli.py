"""The command lines' restart with huge pages for malloc (cli.restart_with_huge_pages)."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from simclr_jax import cli

if not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"):
    pytest.skip("glibc tunables exist on Linux with glibc only", allow_module_level=True)

# Restarts (once), then reports its PID, its tunables and whether malloc asked the kernel for
# huge pages (madvise(MADV_HUGEPAGE), the "hg" VmFlag) for the mapping of a fresh 256 MiB block.
# How many huge pages the kernel then finds depends on its free memory, so that is not asserted.
PROGRAM = """
import ctypes, os
from simclr_jax import cli
print("start", os.getpid(), flush=True)
cli.restart_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(1 << 28)
ctypes.memset(block, 1, 1 << 28)
flags, inside = [], False
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and not fields[0].endswith(":"):
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        inside = start <= block < end
    elif inside and fields[0] == "VmFlags:":
        flags = fields[1:]
print("tunables", os.environ.get("GLIBC_TUNABLES"))
print("vmflags", *flags)
"""


def _run(env_overrides: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",)}
    env.update(env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.split("\n")


def _thp_mode() -> str:
    """The kernel's transparent huge page mode: always, madvise or never."""
    path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else "[never]"
    return text[text.index("[") + 1 : text.index("]")]


def _advised_huge(lines: list[str]) -> bool:
    """Whether the block's mapping carries MADV_HUGEPAGE."""
    flags = next(line for line in lines if line.startswith("vmflags")).split()[1:]
    assert "rd" in flags  # the block's mapping was found
    return "hg" in flags


def test_restarts_once_with_huge_pages_and_keeps_other_tunables():
    lines = _run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})
    starts = [line for line in lines if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # re-executed once, in the same process
    assert f"tunables glibc.malloc.trim_threshold=1048576:{cli.HUGE_PAGES_TUNABLE}" in lines
    if _thp_mode() == "madvise":  # glibc advises only where the kernel waits to be asked
        assert _advised_huge(lines)


def test_opt_out_and_an_explicit_setting_are_left_alone():
    for env in ({"SIMCLR_JAX_HUGE_PAGES": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):
        lines = _run(env)
        assert sum(line.startswith("start") for line in lines) == 1
        assert f"tunables {env.get('GLIBC_TUNABLES')}" in lines
        assert not _advised_huge(lines)


def test_listed_errors_end_the_command_in_one_line_and_others_pass_through():
    with pytest.raises(SystemExit) as exit_info, cli.errors_as_one_line(ValueError, OSError):
        raise FileNotFoundError("files not found:\n  a.idx\n  b.idx")
    assert exit_info.value.code == "error: files not found: a.idx b.idx"
    with pytest.raises(KeyError), cli.errors_as_one_line(ValueError):
        raise KeyError("not listed")
    with cli.errors_as_one_line(ValueError):
        pass  # nothing raised: the block simply runs
