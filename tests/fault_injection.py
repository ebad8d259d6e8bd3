"""``python tests/fault_injection.py FAULT [dpojax arguments]``: the ``dpojax`` command with one fault injected
in this process, at a point a test cannot otherwise reach on time (tests only).

- ``sigterm-in-agreement:N``: SIGTERM arrives while the N-th stop agreement gathers the processes' flags, as a
  preemption notice that lands mid-collective;
- ``sigterm-in-save:STEP``: SIGTERM arrives while the checkpoint of optimizer step STEP is being written (for
  the last step: after the last agreement);
- ``sigkill-in-save:STEP``: the process is killed (SIGKILL) while the checkpoint of STEP is being written.
"""

import os
import signal
import sys


def inject(fault: str) -> None:
    from dpojax.train import checkpoint, harness

    kind, _, value = fault.partition(":")
    count = int(value)
    if kind == "sigterm-in-agreement":
        gather, calls = harness.any_process, []

        def any_process(flag: bool) -> bool:
            calls.append(flag)
            if len(calls) == count:
                os.kill(os.getpid(), signal.SIGTERM)  # handled before the gather below starts
            return gather(flag)

        harness.any_process = any_process
    elif kind in ("sigterm-in-save", "sigkill-in-save"):
        save = checkpoint.Checkpointer.save
        sig = signal.SIGTERM if kind == "sigterm-in-save" else signal.SIGKILL

        def saving(self, state, meta, data=None):
            save(self, state, meta, data)  # returns with the write in flight
            if int(state.step) == count:
                os.kill(os.getpid(), sig)

        checkpoint.Checkpointer.save = saving
    else:
        raise SystemExit(f"fault_injection: unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    from dpojax.cli import main

    sys.exit(main(sys.argv[2:]))
