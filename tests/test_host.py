"""The ``dpojax`` command's process settings (dpojax.host): what it adds to the environment, and the one
re-execution that makes glibc read its malloc tunable."""

import os
import subprocess
import sys

from dpojax.host import host_environment


def test_adds_each_setting_the_environment_lacks():
    env = host_environment({"PATH": "/bin"}, cores=6, glibc=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=6"
    assert env["PATH"] == "/bin"


def test_keeps_what_the_user_set():
    user = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
            "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"}
    env = host_environment(user, cores=2, glibc=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["XLA_FLAGS"] == user["XLA_FLAGS"]
    assert host_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, 2, True)["GLIBC_TUNABLES"] == \
        "glibc.malloc.hugetlb=0"
    assert host_environment({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, 2, True)["XLA_FLAGS"] == \
        "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
    assert "GLIBC_TUNABLES" not in host_environment({}, cores=2, glibc=False)  # another libc: nothing to tune


PROBE = ("import os; print('start', flush=True); from dpojax.host import prepare_process; prepare_process(); "
         "print(os.environ.get('GLIBC_TUNABLES'), os.environ['XLA_FLAGS'])")


def run_probe(env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    return done.stdout.splitlines()


def test_re_executes_once_to_set_the_malloc_tunable():
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    lines = run_probe(base)
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        assert lines[:2] == ["start", "start"]  # the same command line, run again with the tunable
        assert lines[2].split()[0] == "glibc.malloc.hugetlb=1"
    else:
        assert lines[0] == "start" and lines[1].split()[0] == "None"
    assert "--xla_force_host_platform_device_count=" in lines[-1]
    already = run_probe({**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert [line.split()[0] for line in already] == ["start", "glibc.malloc.hugetlb=1"]  # set: no second run
