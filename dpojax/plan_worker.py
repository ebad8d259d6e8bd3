"""The process ``dpojax plan`` compiles in: it stops XLA:CPU once its buffer assignment exists.

XLA:CPU ends a compile by building the dependency graph its thunk runtime executes, in time quadratic in the
number of operations: SDXL's training step reaches its buffer assignment long before that graph is built
(profiled: transitive reduction and buffer-conflict checks; docs/planner.md has the times). The plan executes
nothing, so it stops there: XLA dumps the buffer assignment as text (``xla_dump_to``) before building the
graph; this process compiles in a thread, reads the dump once it is complete, writes its numbers and exits
without waiting for the rest. They are the numbers ``Compiled.memory_analysis()`` reports
(``tests/test_plan.py`` checks they are equal).

Run by ``dpojax.plan.plan_training`` as ``python -m dpojax.plan_worker WORKDIR``: ``WORKDIR/request.pkl``
holds (config, mesh sizes, architecture folder, device memory in bytes, platform); the result, the
``Plan``'s fields or an error, goes to ``WORKDIR/result.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import sys
import threading
import time
import traceback
from pathlib import Path

STEP_MODULE = "jit_update"  # XLA's name for the jitted ``update`` step
# The dump files XLA writes after optimization, in this order: the buffer assignment is complete once the
# memory-usage report exists.
ASSIGNMENT_SUFFIX = ".cpu_after_optimizations-buffer-assignment.txt"
LAST_SUFFIX = ".cpu_after_optimizations-memory-usage-report.txt"
ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$", re.M)


def dump_options(directory: Path) -> dict:
    """XLA compiler options that dump the step's buffer assignment (and nothing of other modules)."""
    return {"xla_dump_to": str(directory), "xla_dump_hlo_as_text": True,
            "xla_dump_hlo_module_re": f"^{STEP_MODULE}$", "xla_dump_disable_metadata": True}


def memory_from_buffer_assignment(text: str) -> dict[str, int]:
    """Bytes per device as ``memory_analysis`` counts them: arguments (entry parameters), outputs (live-out
    buffers), aliased (parameters written as outputs: donation), temporaries (the preallocated scratch).
    Thread-local buffers (inside fused kernels) and constants are not device memory the step allocates."""
    sizes = dict.fromkeys(("arguments", "outputs", "aliased", "temporaries"), 0)
    for size, kind in ALLOCATION.findall(text):
        live_out = "maybe-live-out" in kind
        if kind.startswith("parameter"):
            sizes["arguments"] += int(size)
            sizes["aliased"] += int(size) if live_out else 0
        if live_out or kind.startswith("output shape"):
            sizes["outputs"] += int(size)
        if kind.startswith("preallocated-temp"):
            sizes["temporaries"] += int(size)
    return sizes


def read_dumped_memory(directory: Path, compile_done: bool) -> dict[str, int] | None:
    """The step's memory from its dumped buffer assignment, or None while it is not completely written."""
    assignment = next(directory.glob(f"*{STEP_MODULE}{ASSIGNMENT_SUFFIX}"), None)
    if assignment is None or not (compile_done or next(directory.glob(f"*{STEP_MODULE}{LAST_SUFFIX}"), None)):
        return None
    return memory_from_buffer_assignment(assignment.read_text())


def compile_until_buffer_assignment(lowered, directory: Path, poll_seconds: float = 0.5) -> dict[str, int]:
    """Compile ``lowered`` in a daemon thread and return its memory as soon as XLA has dumped it."""
    failure: list[BaseException] = []

    def run():
        try:
            lowered.compile(compiler_options=dump_options(directory))
        except BaseException as err:  # noqa: BLE001 -- handed to the waiting thread
            failure.append(err)

    thread = threading.Thread(target=run, name="xla-compile", daemon=True)
    thread.start()
    while True:
        thread.join(poll_seconds)
        done = not thread.is_alive()
        if failure:
            raise failure[0]
        memory = read_dumped_memory(directory, done)
        if memory is not None:
            return memory
        if done:
            raise RuntimeError(f"XLA wrote no buffer assignment of {STEP_MODULE} to {directory}")


def measure(config, mesh_sizes: dict[str, int], folder: Path, device_memory: int, platform: str, workdir: Path):
    """The plan of ``config``'s step for ``platform`` on a mesh of fake CPU devices (this process must not have
    started JAX)."""
    import jax

    from dpojax import parallel
    from dpojax.plan import Plan, abstract_step, flops_per_device, held_bytes, micro_pairs_per_device, plan_xla_flags

    count = math.prod(mesh_sizes.values())
    os.environ["XLA_FLAGS"] = plan_xla_flags(os.environ.get("XLA_FLAGS", ""))  # read when JAX starts XLA
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
    # A persistent-cache hit (JAX_COMPILATION_CACHE_DIR set) would skip the compile, and with it the dump read here.
    jax.config.update("jax_enable_compilation_cache", False)
    mesh = parallel.make_mesh(**mesh_sizes, devices=jax.devices("cpu")[:count])
    setup, program, config = abstract_step(config, mesh, folder, platform)
    start = time.perf_counter()
    lowered = program.lower()
    flops = flops_per_device(lowered, count)
    memory = compile_until_buffer_assignment(lowered, workdir / "xla")
    return Plan(objective=config.objective, platform=platform, mesh=dict(mesh.shape),
                pairs_per_device=micro_pairs_per_device(config),
                remat=config.model.remat, attention=config.model.attention, **held_bytes(setup, program), **memory,
                flops_per_device=flops, device_memory=device_memory,
                compile_seconds=time.perf_counter() - start)


def main(workdir: Path) -> None:
    """Write the plan (or the error) to ``result.json``, then exit at once: the compile thread may still be
    building XLA's run-time graph, which nobody needs."""
    config, mesh_sizes, folder, device_memory, platform = pickle.loads((workdir / "request.pkl").read_bytes())
    try:
        result = {"plan": dataclasses.asdict(measure(config, mesh_sizes, Path(folder), device_memory, platform,
                                                     workdir))}
    except Exception as err:  # noqa: BLE001 -- reported by the parent process
        traceback.print_exc()  # into the worker's log, which the parent shows for errors that are not the user's
        result = {"error": f"{err}", "type": type(err).__name__,
                  "user_error": isinstance(err, ValueError | OSError | ImportError)}  # a config, a folder
    partial = workdir / "result.json.partial"
    partial.write_text(json.dumps(result))
    partial.replace(workdir / "result.json")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
