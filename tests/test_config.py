"""YAML + overrides -> typed Config; every bad input is a one-line error naming its key; JSON round trip."""

import json
import os

import pytest

from dpojax.config import Config, ConfigError, load_config

YAML = """
model:
  pretrained: /models/sd15
  lora_rank: 8
  lora_alpha: null
  lora_targets: [to_q, to_v]
data:
  resolution: 256
  flip: joint
loss:
  type: robust
  label_smoothing: 0.1
optim:
  lr: 1e-8            # PyYAML reads this as a string; the float field converts it
  lr_scaling: pairs
  betas: [0.9, 0.99]
  max_grad_norm: null
dpo:
  steps: 10
  grad_accum: 128
mesh:
  data: -1
  fsdp: 2
"""


@pytest.fixture
def yaml_path(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(YAML)
    return path


def test_defaults_are_the_official_sd15_launcher():
    config = load_config()
    assert config.loss.type == "sigmoid" and config.loss.beta == 5000.0
    assert (config.optim.name, config.optim.lr, config.optim.betas) == ("adamw", 2.048e-5, (0.9, 0.999))
    assert (config.optim.weight_decay, config.optim.eps, config.optim.max_grad_norm) == (1e-2, 1e-8, 1.0)
    assert config.data.caption_dropout == 0.2 and config.data.flip == "per_image"
    assert (config.d3po.num_steps, config.d3po.eta, config.d3po.beta, config.d3po.eps) == (20, 1.0, 0.1, 0.1)
    assert config == Config()


def test_yaml_and_overrides_give_typed_values(yaml_path):
    config = load_config(yaml_path, ["optim.lr=2.048e-5", "optim.lr_scaling=none", "dpo.steps=20",
                                     "data.random_crop=true", "model.pretrained=2024", "model.vae=null",
                                     "optim.betas=[0.8, 0.95]", "optim.max_grad_norm=0.5",
                                     "model.lora_targets=[to_k]", "train.seed=7"])
    assert config.model.pretrained == "2024"  # a string field keeps the override text as is
    assert config.model.lora_rank == 8 and config.model.lora_alpha is None
    assert config.model.lora_targets == ("to_k",)
    assert config.data.resolution == 256 and config.data.flip == "joint" and config.data.random_crop is True
    assert config.loss.type == "robust" and config.loss.label_smoothing == 0.1
    assert config.optim.lr == 2.048e-5 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.95) and config.optim.max_grad_norm == 0.5
    assert config.dpo.steps == 20 and config.train.seed == 7
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 2, 1)


def test_yaml_values_without_overrides(yaml_path):
    config = load_config(yaml_path)
    assert config.optim.lr == 1e-8 and config.optim.max_grad_norm is None
    assert config.optim.betas == (0.9, 0.99) and config.model.lora_targets == ("to_q", "to_v")
    assert config.pairs_per_step(batch_devices=16) == 16 * 128
    assert config.learning_rate(batch_devices=16) == pytest.approx(2.048e-5)  # the launchers' --scale_lr


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1e-5"], "config: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["lr=1e-5"], "config: unknown key 'lr' (did you mean 'optim.lr'?)"),
    (["optimm.lr=1e-5"], "config: unknown key 'optimm' (did you mean 'optim'?)"),
    (["optim.lr=abc"], "config: optim.lr must be a float, got 'abc'"),
    (["dpo.steps=1.5"], "config: dpo.steps must be an int, got 1.5"),
    (["dpo.steps=true"], "config: dpo.steps must be an int, got True"),
    (["data.random_crop=maybe"], "config: data.random_crop must be a bool (true/false), got 'maybe'"),
    (["data.flip=sideways"], "config: data.flip must be one of 'per_image', 'joint', 'none', got 'sideways'"),
    (["optim.betas=[0.9]"], "config: optim.betas must be a list of 2 items, got [0.9]"),
    (["optim.betas=[0.9, x]"], "config: optim.betas[1] must be a float, got 'x'"),
    (["optim.lr=null"], "config: optim.lr must be a float, got null"),
    (["optim.lr=-1"], "config: optim.lr must be > 0, got -1.0"),
    (["mesh.fsdp=0"], "config: mesh.fsdp must be > 0 or -1, got 0"),
    (["optim=3"], "config: optim must be a mapping, got 3"),
    (["loss.label_smoothing=0.1"],
     "config: loss.label_smoothing applies only to loss.type 'robust', got type 'sigmoid'"),
    (["train.eval_every=10"], "config: train.eval_every needs train.eval_scorer (e.g. pickscore, with "
                              "scorers.pickscore_model)"),
    (["optim.lr"], "config: bad override 'optim.lr' (expected key=value, e.g. optim.lr=1e-5)"),
    (["=3"], "config: bad override '=3' (expected key=value, e.g. optim.lr=1e-5)"),
    (["optim..lr=3"], "config: bad override 'optim..lr=3' (expected key=value, e.g. optim.lr=1e-5)"),
])
def test_override_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lrr: 1\n", "config: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("data:\n  flip: 3\n", "config: data.flip must be one of 'per_image', 'joint', 'none', got 3"),
    ("model:\n  pretrained: 12\n", "config: model.pretrained must be a string, got 12"),
    ("data: [1, 2]\n", "config: data must be a mapping, got [1, 2]"),
])
def test_yaml_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == message


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: cannot read .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections, got list$"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("optim: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "broken.yaml")
    assert "\n" not in str(info.value) and "is not valid YAML" in str(info.value)


def test_json_round_trip(yaml_path):
    config = load_config(yaml_path, ["loss.beta=2500"])
    text = json.dumps(config.to_dict())
    assert Config.from_dict(json.loads(text)) == config
    assert json.loads(text)["optim"]["betas"] == [0.9, 0.99]


def test_parsing_is_deterministic_and_writes_nothing(tmp_path, yaml_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.walk(tmp_path))
    overrides = ["optim.lr=3e-5", "dpo.steps=5"]
    first = load_config(yaml_path, overrides)
    assert load_config(yaml_path, overrides) == first
    assert sorted(os.walk(tmp_path)) == before
    assert overrides == ["optim.lr=3e-5", "dpo.steps=5"]  # inputs untouched


@pytest.mark.parametrize("objective, overrides, message", [
    ("d3po", ["data.resolution=32"], "config: data.resolution is not read by objective 'd3po' "
                                     "(did you mean 'd3po.resolution'?)"),
    ("d3po", ["loss.beta=1"], "config: loss.beta is not read by objective 'd3po' (did you mean 'd3po.beta'?)"),
    ("dpo", ["d3po.num_steps=4"], "config: d3po.num_steps is not read by objective 'dpo'"),
    ("dpo", ["d3po.log_every=4"], "config: d3po.log_every is not read by objective 'dpo' "
                                  "(did you mean 'dpo.log_every'?)"),
])
def test_a_key_the_objective_does_not_read_is_a_one_line_error(objective, overrides, message):
    base = ["objective=d3po", "d3po.prompts=[a cat]"] if objective == "d3po" else []
    with pytest.raises(ConfigError) as info:
        load_config(None, [*base, *overrides])
    assert str(info.value) == message


def test_each_objective_has_its_papers_optimizer_defaults_and_meanings():
    dpo = load_config()
    d3po = load_config(None, ["objective=d3po", "d3po.prompts=[a cat]", "optim.weight_decay=0.5"])
    assert (dpo.optim.lr, dpo.optim.warmup_steps, dpo.optim.weight_decay) == (2.048e-5, 500, 1e-2)
    assert (d3po.optim.lr, d3po.optim.warmup_steps, d3po.optim.weight_decay) == (3e-5, 0, 0.5)
    assert d3po.resolution == d3po.d3po.resolution and dpo.resolution == dpo.data.resolution
    # optim.lr_scaling=pairs multiplies by what each objective trains per optimizer step
    scaled = load_config(None, ["objective=d3po", "d3po.prompts=[a]", "optim.lr_scaling=pairs",
                                "d3po.train_batch_size=2", "d3po.sample_batch_size=2"])
    assert scaled.learning_rate(batch_devices=4) == pytest.approx(3e-5 * 2 * 4)
    assert Config.from_dict(d3po.to_dict()) == d3po and set(d3po.to_dict()) == {
        "objective", "model", "mesh", "logging", "train", "optim", "d3po", "scorers"}


def test_every_key_is_documented_once_by_the_config_command(capsys):
    from dpojax.cli import main

    assert main(["config", "--list"]) == 0
    listing = capsys.readouterr().out
    documented = [line.split(" = ")[0].strip() for line in listing.splitlines()
                  if line.startswith("  ") and not line.startswith("   ")]  # keys; their meanings are indented more
    sections = {"model", "mesh", "logging", "train", "optim", "dpo", "data", "loss", "d3po", "scorers"}
    keys = [k for k in _all_keys() if k not in sections]
    assert sorted(documented) == sorted(keys) and len(documented) == len(set(documented))
    assert "optim.lr = 2.048e-05 (d3po: 3.0e-05)" in listing


def _all_keys():
    from dpojax.config import _all_keys as keys

    return keys()


def test_bf16_policy_weights_are_refused_with_the_reason():
    """No optimizer keeps fp32 master weights, so bf16 weights would round lr-sized updates away."""
    for optimizer in ("adamw", "adafactor"):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["model.param_dtype=bfloat16", f"optim.name={optimizer}"])
        message = str(err.value)
        assert f"model.param_dtype=bfloat16 with optim.name={optimizer} would stall training" in message
        assert "master weights" in message and "model.dtype=bfloat16" in message and "\n" not in message
