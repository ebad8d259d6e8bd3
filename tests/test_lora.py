"""LoRA adapters: the layer against its formula in NumPy, zero-initialised adapters against the base UNet, the
export against diffusers (``load_lora_weights`` with PEFT, and the merged UNet), config errors, and a LoRA
Diffusion-DPO run through the ``dpojax`` command."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from helpers import rel_err
from safetensors import safe_open

from dpojax import cli
from dpojax.components import abstract_lora_policy, lora_spec, split_params
from dpojax.config import ConfigError, ModelConfig, load_config
from dpojax.models import UNet2DConditionModel
from dpojax.models.lora import LoRALinear, LoRASpec, init_adapters, split_adapters, with_adapters
from dpojax.tiny import TEXT_HIDDEN, UNET_SDXL
from dpojax.train.export import write_policy
from dpojax.weights.lora import LORA_WEIGHTS_NAME, save_lora

CONFIG = "configs/tiny_sdxl_dpo.yaml"
LORA_MODEL = dict(lora_rank=4, lora_alpha=8.0, param_dtype="float32", reference_dtype="float32")  # scale 2


@pytest.fixture(scope="module")
def tiny(tiny_sdxl):
    return tiny_sdxl


def unet_inputs(seed: int = 0, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, 16, 16), dtype=np.float32),
            "timestep": np.asarray([10, 700][:batch]),
            "encoder_hidden_states": rng.standard_normal((batch, 7, UNET_SDXL["cross_attention_dim"]),
                                                         dtype=np.float32),
            "added_cond_kwargs": {"text_embeds": rng.standard_normal((batch, TEXT_HIDDEN), dtype=np.float32),
                                  "time_ids": rng.uniform(0, 64, (batch, 6)).astype(np.float32)}}


def jax_out(graph, params, inputs) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, x: nnx.merge(graph, p)(**x))(params, inputs))


def torch_out(unet: TorchUNet, inputs) -> np.ndarray:
    with torch.no_grad():
        return unet(**jax.tree.map(torch.from_numpy, inputs)).sample.numpy()


def random_adapters(adapters: dict, seed: int) -> dict:
    """Non-zero values for every factor (B too), so a misplaced or ignored adapter changes the output."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), adapters)


@pytest.fixture(scope="module")
def lora_unet(tiny):
    """(config, adapted graph, base params, random adapters) on the tiny pipeline's UNet, fp32."""
    config = load_config(CONFIG, [f"model.{k}={v}" for k, v in LORA_MODEL.items()] +
                         [f"model.pretrained={tiny}"])
    spec = lora_spec(config.model)
    _, base = split_params(UNet2DConditionModel.from_pretrained(tiny, "unet"))
    graph, abstract = abstract_lora_policy(dict(UNET_SDXL), spec, config.model)
    adapters = random_adapters(split_adapters(nnx.to_pure_dict(abstract))[1], seed=1)
    return config, graph, base, adapters


def test_lora_linear_is_w_x_plus_scaled_b_a_x():
    """y = W x + b + (alpha/r) B A x in float64 NumPy, PyTorch layouts (W (out, in), A (r, in), B (out, r))."""
    rank, alpha = 3, 7.5
    layer = LoRALinear(5, 6, rank=rank, alpha=alpha, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 5)), rng.standard_normal(6)
    a, bb = rng.standard_normal((rank, 5)), rng.standard_normal((6, rank))
    layer.kernel.set_value(jnp.asarray(w.T, jnp.float32))
    layer.bias.set_value(jnp.asarray(b, jnp.float32))
    layer.lora_A.kernel.set_value(jnp.asarray(a.T, jnp.float32))
    layer.lora_B.kernel.set_value(jnp.asarray(bb.T, jnp.float32))
    x = rng.standard_normal((4, 5))
    expected = x @ w.T + b + (alpha / rank) * (bb @ (a @ x.T)).T
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), expected, rtol=1e-5, atol=1e-5)


def test_fresh_adapters_leave_the_base_unet_unchanged(lora_unet):
    """B = 0 at init, so the adapted UNet's output equals the plain UNet's bit for bit (policy = reference)."""
    config, graph, base, adapters = lora_unet
    fresh = init_adapters(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters), 4,
                          jax.random.key(0))
    downs = [v for p, v in nnx.traversals.flatten_mapping(fresh).items() if p[-2] == "lora_A"]
    ups = [v for p, v in nnx.traversals.flatten_mapping(fresh).items() if p[-2] == "lora_B"]
    assert len(downs) == len(ups) == 64  # 8 transformer blocks x 2 attentions x (q, k, v, out)
    assert all(np.all(np.asarray(u) == 0) for u in ups)
    assert np.std(np.concatenate([np.ravel(d) for d in downs])) == pytest.approx(1 / 4, rel=0.05)  # N(0, 1/r²)
    plain_graph, _ = nnx.split(UNet2DConditionModel.from_config(UNET_SDXL), nnx.Param)
    inputs = unet_inputs()
    np.testing.assert_array_equal(jax_out(graph, with_adapters(base, fresh), inputs),
                                  jax_out(plain_graph, base, inputs))


def test_lora_export_loads_in_diffusers_and_matches(lora_unet, tiny, tmp_path):
    """Random non-zero adapters (scale 2): diffusers' pipeline with ``load_lora_weights`` (PEFT) gives the
    JAX adapted UNet's output; without the adapters the outputs differ by far more than the tolerance."""
    config, graph, base, adapters = lora_unet
    folder = save_lora(adapters, tmp_path / "lora", lora_spec(config.model))
    assert sorted(p.name for p in folder.iterdir()) == [LORA_WEIGHTS_NAME]
    with safe_open(folder / LORA_WEIGHTS_NAME, "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta == {"unet.r": 4, "unet.lora_alpha": 8.0, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in keys

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    inputs = unet_inputs()
    base_out = torch_out(pipe.unet, inputs)
    pipe.load_lora_weights(folder)
    expected = jax_out(graph, with_adapters(base, adapters), inputs)
    assert rel_err(torch_out(pipe.unet, inputs), expected) <= 1e-4
    assert rel_err(base_out, expected) > 1e-2


@pytest.mark.parametrize("kind", ["unet", "pipeline"])
def test_merged_export_matches(lora_unet, tiny, tmp_path, kind):
    """The full UNet with W + scale·B A folded in loads in diffusers and gives the adapted UNet's output."""
    config, graph, base, adapters = lora_unet
    out = write_policy(graph, adapters, tmp_path / kind, kind, config)
    merged = TorchUNet.from_pretrained(out / "unet" if kind == "pipeline" else out).eval()
    inputs = unet_inputs(seed=3)
    assert rel_err(torch_out(merged, inputs), jax_out(graph, with_adapters(base, adapters), inputs)) <= 1e-4


def test_lora_config_errors(lora_unet):
    with pytest.raises(ConfigError, match=r"^config: model.lora_alpha applies only when model.lora_rank > 0$"):
        load_config(CONFIG, ["model.lora_alpha=8"])
    with pytest.raises(ConfigError, match=r"^config: model.lora_alpha must be > 0, got -1.0$"):
        load_config(CONFIG, ["model.lora_rank=4", "model.lora_alpha=-1"])
    with pytest.raises(ConfigError, match=r"^config: model.lora_targets must name at least one layer"):
        load_config(CONFIG, ["model.lora_rank=4", "model.lora_targets=[]"])
    with pytest.raises(ConfigError, match=r"^config: train.export 'lora' needs model.lora_rank > 0$"):
        load_config(CONFIG, ["train.export=lora"])
    with pytest.raises(ConfigError, match=r"^config: model.lora_targets: lora target 'to_z' matches no layer "
                                          r"of UNet2DConditionModel$"):
        abstract_lora_policy(dict(UNET_SDXL), LoRASpec(4, 4.0, ("to_q", "to_z")), ModelConfig(lora_rank=4))
    with pytest.raises(ConfigError, match=r"lora target 'conv_in' matches conv_in, a Conv; only linear layers"):
        abstract_lora_policy(dict(UNET_SDXL), LoRASpec(4, 4.0, ("conv_in",)), ModelConfig(lora_rank=4))
    config, graph, base, _ = lora_unet
    full = load_config(CONFIG)
    with pytest.raises(ValueError, match=r"^export kind 'lora' needs a LoRA run"):
        write_policy(graph, base, "unused", "lora", full)


@pytest.mark.slow
def test_lora_dpo_run_trains_only_adapters_and_exports(tiny, tmp_path, capsys):
    """`dpojax train ... model.lora_rank=4` on 8 devices: the first loss is ln 2 exactly (policy = reference),
    the checkpoint holds the adapters and their optimizer state only, the final merged pipeline keeps every
    non-adapted weight of the base, and `dpojax export --kind lora` loads in diffusers with the same output as
    the merged UNet."""
    from dpojax.data.pickapic import prepare_pickapic
    from dpojax.data.synth import write_synthetic_pickapic
    from dpojax.train.export import find_checkpoint

    write_synthetic_pickapic(tmp_path / "synth", 16, seed=0, image_size=32)
    prepare_pickapic(tmp_path / "synth", tmp_path / "pairs")
    run = tmp_path / "run"
    overrides = {"model.pretrained": tiny, "data.data_dir": tmp_path / "pairs", "train.output_dir": run,
                 "dpo.steps": 3, "dpo.pairs_per_device": 1, "train.checkpoint_every": 0,
                 "dpo.log_every": 1, "train.export": "pipeline", "logging.tensorboard": False,
                 "optim.warmup_steps": 0, "model.lora_rank": 4}
    assert cli.main(["train", CONFIG, *(f"{k}={v}" for k, v in overrides.items())]) == 0, capsys.readouterr()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and records[0]["margin"] == 0.0
    assert records[-1]["loss"] != records[0]["loss"]

    import orbax.checkpoint as ocp

    directory, step = find_checkpoint(run)
    params, train = (ocp.StandardCheckpointer().metadata(directory / str(step) / item).item_metadata
                     for item in ("params", "train"))
    param_paths = list(nnx.traversals.flatten_mapping(dict(params)))
    assert len(param_paths) == 128 and all(p[-2] in ("lora_A", "lora_B") for p in param_paths)
    opt_leaves = [x for x in jax.tree.leaves(train["opt_state"]) if x.shape]
    assert len(opt_leaves) == 2 * 128  # Adam's two moments of each adapter, nothing of the base UNet

    assert cli.main(["export", str(run), str(tmp_path / "lora"), "--kind", "lora"]) == 0
    base = TorchUNet.from_pretrained(tiny / "unet").eval()
    merged = TorchUNet.from_pretrained(run / "final" / "unet").eval()
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    adapted = [k for k in base_sd if any(f".{t}.weight" in k for t in ("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(adapted) == 64
    assert all(torch.equal(base_sd[k], merged_sd[k]) for k in base_sd if k not in adapted)
    assert not any(torch.equal(base_sd[k], merged_sd[k]) for k in adapted)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(tmp_path / "lora")
    inputs = unet_inputs(seed=5)
    assert rel_err(torch_out(pipe.unet, inputs), torch_out(merged, inputs)) <= 1e-4
