"""The run harness's pieces: the cadence rule, the loader's three weight modes, and the stop agreement."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import pytest

from dpojax.config import load_config
from dpojax.train.checkpoint import Checkpointer
from dpojax.train.harness import Setup, StopRequest, itstime
from dpojax.train.metrics import clock, progress_line
from dpojax.train.state import TrainState

CONFIG = "configs/tiny_sdxl_dpo.yaml"


def test_one_cadence_rule_for_logs_checkpoints_evaluations_and_samples():
    assert [s for s in range(1, 11) if itstime(s, 4, 10)] == [4, 8, 10]  # every 4, and the last step
    assert [s for s in range(1, 11) if itstime(s, 0, 10)] == [10]  # 0: only at the end
    assert [s for s in range(0, 5) if itstime(s, 2)] == [0, 2, 4]  # no end: epochs counted from 0


@pytest.mark.parametrize("lora", [0, 4])
def test_a_resumed_run_reads_no_policy_weights_and_the_planner_none(tiny_sdxl, lora):
    """weights="frozen" (resume: the checkpoint replaces the policy) leaves the policy shape-only and reads the
    frozen models; "none" (dpojax plan) reads nothing. Shapes, dtypes and shardings are those of "all"."""
    config = load_config(CONFIG, [f"model.pretrained={tiny_sdxl}", f"model.lora_rank={lora}"])
    built = {weights: Setup.build(config, weights=weights) for weights in ("all", "frozen", "none")}
    is_array = lambda tree: {isinstance(x, jax.Array) for x in jax.tree.leaves(tree)}  # noqa: E731
    assert is_array(built["all"].params) == is_array(built["all"].frozen) == {True}
    assert is_array(built["frozen"].params) == {False} and is_array(built["frozen"].frozen) == {True}
    assert is_array(built["none"].params) == is_array(built["none"].frozen) == {False}
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)  # noqa: E731
    for weights in ("frozen", "none"):
        assert spec(built[weights].params) == spec(built["all"].params)
        assert spec(built[weights].frozen) == spec(built["all"].frozen)
        assert spec(built[weights].abstract_state()) == spec(built["all"].init_state())


def test_the_stop_request_turns_a_signal_into_a_flag():
    stop = StopRequest()
    with stop.installed():
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # the previous handler is back


def _state(step: int) -> TrainState:
    return TrainState(jnp.int32(step), {"w": jnp.full(3, float(step))}, {}, jnp.zeros(2, jnp.uint32))


def test_the_best_is_named_once_its_checkpoint_is_committed_and_never_a_nan(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=1)
    best = lambda: json.loads((tmp_path / "best.json").read_text())  # noqa: E731
    try:
        for step, score in ((1, 5.0), (2, float("nan")), (3, 4.0), (4, 6.0)):
            checkpointer.record_score(step, score)
            if step == 4:
                assert best() == {"step": 1, "score": 5.0}  # 4 is better, but not saved yet
            checkpointer.save(_state(step), {})
        checkpointer.wait()
        assert best() == {"step": 4, "score": 6.0} and checkpointer.best_step() == 4
        checkpointer.record_score(5, float("nan"))
        checkpointer.save(_state(5), {})
        checkpointer.wait()
        assert checkpointer.best_step() == 4  # a NaN is never the best, nor beats it
        assert sorted(checkpointer.manager.all_steps()) == [4, 5]  # the latest, and the best beyond keep=1
    finally:
        checkpointer.close()


def test_progress_lines_end_with_the_elapsed_time_and_the_estimate_of_the_rest():
    assert clock(3725.4) == "1:02:05" and clock(30 * 3600) == "30:00:00" and clock(0) == "0:00:00"
    line = progress_line(3, 10, {"loss": 0.5}, 2.0, elapsed=65.0, remaining=7 * 65.0 / 3)
    assert line == "step 3/10 | loss 0.5000 | 2.00 pairs/s | elapsed 0:01:05, ETA 0:02:32"


def test_a_signal_handled_during_the_agreement_is_taken_up_at_the_next(monkeypatch):
    """The decision is the gathered flags alone: a SIGTERM handled while they are gathered does not change this
    agreement's answer (the other hosts gathered False too), only the next one's."""
    from dpojax.train import harness

    gather = harness.any_process

    def signalled_mid_gather(flag):
        os.kill(os.getpid(), signal.SIGTERM)
        return gather(flag)

    stop = StopRequest()
    with stop.installed():
        monkeypatch.setattr(harness, "any_process", signalled_mid_gather)
        assert not stop.agreed() and stop.signal_name == "SIGTERM" and stop.stopped_by is None
        monkeypatch.setattr(harness, "any_process", gather)
        assert stop.agreed() and stop.stopped_by == "SIGTERM"
