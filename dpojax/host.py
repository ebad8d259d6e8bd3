"""How the ``dpojax`` command sets up its own process before JAX starts a backend (docs/performance.md).

Two settings for CPU hosts, each left alone where the environment already chooses it:

- glibc's malloc backs its large blocks with transparent huge pages (``glibc.malloc.hugetlb=1``). XLA's CPU
  runtime allocates each step's temporary buffer afresh, a block glibc maps for the call and unmaps after it,
  so with 4 KiB pages every step takes a page fault per 4 KiB of that buffer. glibc reads its tunables only
  when a process starts, hence one re-execution of the command with the tunable set.
- one XLA CPU device per usable core (``--xla_force_host_platform_device_count``): each core then runs whole
  kernels on its own share of the batch instead of splitting every small kernel between threads. The count is
  the CPU backend's only; on a GPU or TPU host the command still runs on the accelerators.
"""

from __future__ import annotations

import os
import platform
import sys

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def host_environment(environ: dict[str, str], cores: int, glibc: bool) -> dict[str, str]:
    """``environ`` with the settings added where it does not set them already."""
    env = dict(environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if glibc and HUGE_PAGE_TUNABLE not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{HUGE_PAGE_TUNABLE}=1"]))
    flags = env.get("XLA_FLAGS", "").split()
    if not any(flag.split("=")[0] == CPU_DEVICES_FLAG for flag in flags):
        env["XLA_FLAGS"] = " ".join([*flags, f"{CPU_DEVICES_FLAG}={cores}"])
    return env


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_process() -> None:
    """Apply :func:`host_environment` to this process: XLA's flags in place (JAX reads them when its first
    backend starts), the malloc tunable by re-executing the same command line once."""
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    env = host_environment(dict(os.environ), usable_cores(), glibc)
    os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]
    if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
