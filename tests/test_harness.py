"""The run harness's pieces: the cadence rule, the loader's three weight modes, and the stop agreement."""

import os
import signal

import jax
import pytest

from dpojax.config import load_config
from dpojax.train.harness import Setup, StopRequest, itstime

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
