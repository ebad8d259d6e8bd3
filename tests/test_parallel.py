"""Mesh, logical-axis rules and FSDP placement of the tiny SDXL-shaped UNet on 8 fake CPU devices."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from dpojax import parallel
from dpojax.models import UNet2DConditionModel, layers
from dpojax.tiny import UNET_SDXL
from dpojax.weights import naming
from dpojax.weights.io import load_pretrained


class Unet(UNet2DConditionModel):
    weights_layout = "diffusers"


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """The tiny UNet with random weights in diffusers layout, written without torch."""
    folder = tmp_path_factory.mktemp("unet")
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(UNET_SDXL, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    weights = {key: (0.2 * rng.standard_normal(shape)).astype(np.float32)
               for key, shape in naming.to_state_dict_shapes(abstract).items()}
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(__import__("json").dumps(UNET_SDXL))
    return folder


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(data=2, fsdp=4)


def test_make_mesh_fills_and_rejects_bad_sizes():
    mesh = parallel.make_mesh(data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.make_mesh(data=3)
    with pytest.raises(ValueError, match="needs 4 devices, 8 available"):
        parallel.make_mesh(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="only one axis"):
        parallel.make_mesh(data=-1, fsdp=-1)


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.conv = layers.conv2d(3, 6, rngs=rngs)  # 6 output channels: not divisible by fsdp=4
        self.proj = layers.linear(30, 8, rngs=rngs)  # 30 input features: not divisible by 4
        self.out = layers.linear(8, 12, rngs=rngs)
        self.embed = layers.embedding(10, 16, rngs=rngs)


def test_non_divisible_dims_are_replicated(mesh, caplog):
    state = nnx.state(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))))
    with caplog.at_level(logging.DEBUG, logger="dpojax.parallel"):
        specs = {path: var.get_value().spec
                 for path, var in nnx.to_flat_state(parallel.state_shardings(state, mesh))}
    assert specs[("conv", "kernel")] == P(None, None, None, None)
    assert specs[("proj", "kernel")] == P(None, "tensor")
    assert specs[("out", "kernel")] == P("fsdp", "tensor")
    assert specs[("embed", "embedding")] == P(None, "fsdp")
    assert specs[("out", "bias")] == P()
    assert "conv.kernel: replicating dim 3 of size 6" in caplog.text

    # Two logical names on the same mesh axis: the second dimension stays replicated.
    specs = parallel.state_shardings(state, mesh, rules={"mlp": "fsdp"})
    assert specs["out"]["kernel"].get_value().spec == P("fsdp", None)
    with pytest.raises(ValueError, match="no mesh rule for logical axis 'embed'"):
        parallel.partition_spec((4,), ("embed",), mesh, {})
    with pytest.raises(ValueError, match="mesh has no axis 'model'"):
        parallel.state_shardings(state, mesh, rules={"embed": "model"})


@pytest.mark.filterwarnings("ignore:'sharding:DeprecationWarning")
@pytest.mark.parametrize("key", ["out_sharding", "sharding_names", "sharding"])
def test_logical_axes_reads_every_flax_metadata_name(key):
    assert parallel.logical_axes(nnx.Param(jnp.zeros((4, 2)), **{key: ("embed", None)})) == ("embed", None)
    assert parallel.logical_axes(nnx.Param(jnp.zeros((4,)))) is None


def test_unet_is_fsdp_sharded_and_forward_matches_single_device(unet_folder, mesh):
    sharded = load_pretrained(Unet, unet_folder, mesh=mesh)
    single = load_pretrained(Unet, unet_folder)

    total = per_device = 0
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        value = var.get_value()
        if path[-1] == "kernel" and max(value.shape) >= 32:
            assert "fsdp" in value.sharding.spec, (path, value.shape, value.sharding.spec)
        total += value.nbytes
        per_device += value.addressable_shards[0].data.nbytes
    ratio = per_device / total
    print(f"per-device parameter bytes: {per_device} of {total} ({ratio:.3f})")
    assert 0.22 <= ratio <= 0.40

    rng = np.random.default_rng(1)
    inputs = (rng.standard_normal((8, 4, 8, 8)), np.linspace(1, 900, 8), rng.standard_normal((8, 7, 64)),
              rng.standard_normal((8, 32)), rng.standard_normal((8, 6)) * 100)
    inputs = [jnp.asarray(x, jnp.float32) for x in inputs]

    def forward(model, sample, t, context, text_embeds, time_ids):
        return model(sample, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})

    graphdef, state = nnx.split(sharded)
    jitted = jax.jit(lambda s, *x: forward(nnx.merge(graphdef, s), *x))
    data = parallel.batch_sharding(mesh)
    out_sharded = jitted(state, *[jax.device_put(x, data) for x in inputs])
    out_single = jitted(nnx.state(single), *inputs)
    assert len(out_single.devices()) == 1
    assert out_sharded.sharding.spec[0] == ("data", "fsdp")
    err = np.linalg.norm(np.asarray(out_sharded) - np.asarray(out_single)) / np.linalg.norm(out_single)
    assert err < 1e-5, err


def test_data_parallel_per_device_equals_the_whole_batch():
    """Per device (one flat all-reduce of the gradients) and on the global arrays give the same gradients, means
    and per-row outputs, for a loss that is a mean over rows."""
    mesh = parallel.make_mesh(data=4, fsdp=2)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32), "b": jnp.asarray(rng.standard_normal(5))}
    x, y = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32), jnp.asarray(rng.standard_normal((16, 5)))

    def fn(params, scale, x, y):
        def loss(p):
            err = scale * jnp.square(x @ p["w"] + p["b"] - y).mean(axis=1)
            return err.mean(), err
        (value, per_row), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, {"loss": value}, per_row

    whole = jax.jit(lambda *a: parallel.data_parallel(fn, None, a[:2], a[2:]))(params, 2.0, x, y)
    per_device = jax.jit(lambda *a: parallel.data_parallel(fn, mesh, a[:2], a[2:]))(params, 2.0, x, y)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(per_device), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert per_device[2].sharding.spec == P(parallel.BATCH_AXES)


def test_steps_take_gradients_per_device_only_on_a_replicated_cpu_mesh(tiny_sdxl, monkeypatch):
    """The DPO step's update is the same with gradients per device (the CPU default when parameters are
    replicated) and under jit's automatic partitioning; sharded parameters keep the latter."""
    from dpojax import bench
    from dpojax.config import load_config
    from dpojax.train.dpo_step import make_step_functions
    from dpojax.train.harness import Setup

    overrides = [f"model.pretrained={tiny_sdxl}", "dpo.pairs_per_device=1"]
    fsdp = ["mesh.data=1", "mesh.fsdp=-1"]
    assert Setup.build(load_config("configs/tiny_sdxl_dpo.yaml", [*overrides, *fsdp])).gradient_mesh is None
    config = load_config("configs/tiny_sdxl_dpo.yaml", [*overrides, "mesh.data=-1", "mesh.fsdp=1"])
    setup = Setup.build(config)
    assert setup.gradient_mesh is setup.mesh
    batch = parallel.global_batch(bench.dpo_inputs(setup.components, config, setup.batch_devices, False),
                                  setup.mesh)
    per_device = make_step_functions(setup).update(bench.fresh_state(setup), None, setup.frozen, batch, 0)
    monkeypatch.setattr(parallel, "per_device_gradients", lambda *_: False)
    assert setup.gradient_mesh is None
    automatic = make_step_functions(setup).update(bench.fresh_state(setup), None, setup.frozen, batch, 0)
    (state_a, _, metrics_a), (state_b, _, metrics_b) = automatic, per_device
    assert float(metrics_b["grad_norm"]) > 0
    for name in ("loss", "grad_norm", "implicit_acc"):
        assert float(metrics_b[name]) == pytest.approx(float(metrics_a[name]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["configs/tiny_sdxl_dpo.yaml", "configs/tiny_d3po_brightness.yaml"])
def test_the_shipped_cpu_configs_take_the_per_device_gradients_as_given(tiny_sdxl, config):
    """`dpojax train|bench` on a tiny config, as a user types it, gets the fast CPU path on a multi-device CPU:
    their mesh is data parallel, so the weights are replicated."""
    from dpojax.config import load_config
    from dpojax.train.harness import Setup

    setup = Setup.build(load_config(config, [f"model.pretrained={tiny_sdxl}"]), weights="none")
    assert setup.batch_devices == len(jax.devices()) > 1 and setup.gradient_mesh is setup.mesh
