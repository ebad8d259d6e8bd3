"""Multi-process JAX: start ``jax.distributed`` from the command line or the environment, and agree on flags.

One process per host (TPU pod worker, SLURM task, or one per GPU node) runs the same command; they must
connect before anything touches a device. Where the settings come from, first match wins:

1. explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` on the command line, or the
   environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
2. SLURM: inside ``srun`` with more than one task (``SLURM_NTASKS`` > 1), JAX reads the rest itself;
3. a TPU pod slice: more than one worker listed in ``TPU_WORKER_HOSTNAMES``, or a multislice
   ``MEGASCALE_COORDINATOR_ADDRESS``; JAX asks the TPU metadata for the rest;
4. otherwise one process: nothing to start (``--distributed on`` starts it anyway and lets JAX's own cluster
   detection find the rest, which is what a TPU pod whose workers have no such variables needs).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import jax
import numpy as np

EXPLICIT_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                "process_id": "JAX_PROCESS_ID"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process options of every command that trains."""
    group = parser.add_argument_group("multi-process (default: detected from SLURM / TPU pod / JAX_* variables)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, help="processes in the job (env JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's index, 0-based (env JAX_PROCESS_ID)")
    group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                       help="on: always start jax.distributed, letting JAX detect the cluster (Cloud TPU "
                            "metadata, SLURM, Open MPI, Kubernetes) when nothing above names it; off: never")


def detect(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           env: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """(how the job is launched, keyword arguments for ``jax.distributed.initialize``).

    The first is "explicit", "slurm", "tpu" or "single" (nothing to start). A partial explicit setting is a
    one-line error naming what is missing.
    """
    env = os.environ if env is None else env
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in EXPLICIT_ENV.items():
        if given[key] is None and env.get(var):
            given[key] = env[var] if key == "coordinator" else _int_env(var, env[var])
    if any(v is not None for v in given.values()):
        missing = [f"--{k.replace('_', '-')} (or {EXPLICIT_ENV[k]})" for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-process: {', '.join(missing)} must also be given")
        if not 0 <= given["process_id"] < given["num_processes"]:
            raise ValueError(f"multi-process: --process-id {given['process_id']} must be in "
                             f"[0, {given['num_processes']}) for --num-processes {given['num_processes']}")
        if given["num_processes"] == 1:
            return "single", {}
        return "explicit", {"coordinator_address": given["coordinator"], "num_processes": given["num_processes"],
                            "process_id": given["process_id"]}
    if env.get("SLURM_JOB_ID") and _int_env("SLURM_NTASKS", env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm", {"cluster_detection_method": "slurm"}
    workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu", {}
    return "single", {}


def _int_env(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"multi-process: {name}={value!r} is not an integer") from None


def initialize(args: argparse.Namespace | None = None) -> str:
    """Start ``jax.distributed`` when this is one process of several; returns how the job was detected
    ("cluster": ``--distributed on`` left the detection to JAX)."""
    mode = "auto" if args is None else args.distributed
    if mode == "off":
        return "single"
    options = {} if args is None else {"coordinator": args.coordinator, "num_processes": args.num_processes,
                                       "process_id": args.process_id}
    kind, kwargs = detect(**options)
    if kind == "single" and mode == "on":
        kind = "cluster"
    if kind != "single":
        jax.distributed.initialize(**kwargs)
    return kind


# The coordination service's barrier waits this long; a device collective gives up after 30 s without its peers.
BARRIER_TIMEOUT_S = 3600


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (nothing in one process), through the coordination service,
    not a device collective: one host may be busy for minutes (its compiles missed the cache, or it writes the
    export the others wait for), and a collective would give up waiting for it."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=name, timeout_ms=BARRIER_TIMEOUT_S * 1000)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (e.g. a SIGTERM that reached one host),
    so all of them take the same branch and no collective is left waiting."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.bool_))))
