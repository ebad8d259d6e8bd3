"""`dpojax plan`: the shipped full-size architectures, the mesh option, and the compiled step's accounting.

The architecture configs are checked against diffusers/transformers built from the same JSON (PyTorch meta
device: no memory) and the published parameter counts. The planner's per-device bytes are checked against a
hand count from the PyTorch modules' parameters, and the effect of remat and micro-batch size is measured
on the tiny SDXL pipeline.
"""

import dataclasses
import json
import re
import threading
from pathlib import Path

import jax
import pytest
from flax import nnx

from dpojax import cli, parallel
from dpojax.config import load_config
from dpojax.diffusers_folder import read_pipeline_folder
from dpojax.models import UNet2DConditionModel
from dpojax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from dpojax.models.vae import AutoencoderKL
from dpojax.plan import (
    ARCH_ROOT,
    GIB,
    PLAN_SCHEDULER,
    abstract_step,
    held_bytes,
    parse_mesh,
    plan_training,
    plan_xla_flags,
)
from dpojax.plan_worker import (
    ASSIGNMENT_SUFFIX,
    LAST_SUFFIX,
    compile_until_buffer_assignment,
    dump_options,
    read_dumped_memory,
)
from dpojax.weights.io import abstract_module

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_sdxl_dpo.yaml"

# Published parameter counts (diffusers' model cards / `num_parameters()`): a wrong config value changes them.
PUBLISHED = {("sdxl-base-1.0", "unet"): 2_567_463_684, ("sd-v1-5", "unet"): 859_520_964,
             ("sd-v1-5", "vae"): 83_653_863, ("sd-v1-5", "text_encoder"): 123_060_480,
             ("sdxl-base-1.0", "text_encoder_2"): 694_659_840}


def _torch_module(folder: Path, name: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads((folder / name / "config.json").read_text())
    with torch.device("meta"):
        if name == "unet":
            return UNet2DConditionModel.from_config(config)
        if name == "vae":
            return AutoencoderKL.from_config(config)
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig(**config))


def _count(named_parameters, skip=()) -> int:
    """Parameters whose names (without transformers 4.x's "text_model." prefix) do not start with ``skip``."""
    return sum(p.numel() for n, p in named_parameters if not n.removeprefix("text_model.").startswith(skip))


@pytest.mark.parametrize("arch", ["sd-v1-5", "sdxl-base-1.0"])
def test_shipped_architectures_match_diffusers_and_the_published_counts(arch):
    folder = ARCH_ROOT / arch
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    present = [name for name in classes if (folder / name).is_dir()]
    assert len(present) == (4 if read_pipeline_folder(folder).is_sdxl else 3)
    for name in present:
        module = abstract_module(classes[name], json.loads((folder / name / "config.json").read_text()))
        ours = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
        assert ours == _count(_torch_module(folder, name).named_parameters()), name
        if (arch, name) in PUBLISHED:
            assert ours == PUBLISHED[arch, name], name


def test_mesh_option_is_parsed_and_bad_values_get_one_line_errors():
    assert parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh("data=2, fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in ("fsdp=0", "fsdp=-1", "pipe=2", "fsdp", "fsdp=x"):
        with pytest.raises(ValueError, match="--mesh") as err:
            parse_mesh(bad)
        assert "\n" not in str(err.value)


def test_plan_flags_keep_the_users_and_drop_the_device_count():
    """XLA keeps only the last ``--xla_disable_hlo_passes``: the plan's passes join the user's instead."""
    user = "--xla_dump_to=/tmp/x --xla_disable_hlo_passes=foo --xla_force_host_platform_device_count=8"
    plan_passes = "--xla_disable_hlo_passes=cpu-all-reduce-combiner,cse_barrier_expander"
    assert plan_xla_flags(user).split() == ["--xla_dump_to=/tmp/x", PLAN_SCHEDULER, plan_passes + ",foo"]
    own = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"  # a scheduler the user chose stays
    assert plan_xla_flags(own).split() == [own, plan_passes]


def test_plan_command_errors_name_the_culprit(capsys, tmp_path):
    assert cli.main(["plan", str(CONFIG), "--mesh", "fsdp=3x"]) == 2
    assert "--mesh 'fsdp=3x'" in capsys.readouterr().err
    bare = tmp_path / "bare"  # a pipeline folder without its components' configs
    bare.mkdir()
    (bare / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert cli.main(["plan", str(CONFIG), "--mesh", "fsdp=2", "--arch-dir", str(bare)]) == 2
    assert f"{bare} has no subfolder 'unet'" in capsys.readouterr().err  # from the compile process
    assert cli.main(["plan", str(CONFIG), "--device-memory", "0"]) == 2
    assert "--device-memory must be > 0" in capsys.readouterr().err
    assert cli.main(["plan", str(CONFIG), "--mesh", "fsdp=1", "model.arch=sd2", f"model.pretrained={tmp_path}"]) == 2
    assert "no shipped architecture" in capsys.readouterr().err


# ------------------------------------------------------------------------------ compiled plans (tiny SDXL)


@pytest.fixture(scope="module")
def tiny(tiny_sdxl) -> Path:
    return tiny_sdxl


def _overrides(tiny: Path, **overrides) -> list[str]:
    values = {"model.pretrained": tiny, "dpo.pairs_per_device": 2, "model.remat": "none", **overrides}
    return [f"{k}={v}" for k, v in values.items()]


def _plan(tiny: Path, mesh: str = "fsdp=1", **overrides):
    return plan_training(load_config(CONFIG, _overrides(tiny, **overrides)), parse_mesh(mesh), 16)


@pytest.fixture(scope="module")
def baseline(tiny):
    return _plan(tiny)


@pytest.mark.slow
def test_one_device_plan_agrees_with_a_hand_count_of_the_bytes(tiny, baseline):
    """fsdp=1: policy fp32, AdamW's two fp32 moments, reference and encoders fp32 (the tiny config), batch;
    XLA's arguments are those minus what the step never reads (VAE decoder, CLIP-L's unused last layer)."""
    unet = _count(_torch_module(tiny, "unet").named_parameters())
    assert baseline.policy_params == 4 * unet
    assert baseline.reference == 4 * unet
    assert baseline.optimizer_state == 2 * 4 * unet + 2 * 4  # mu, nu; int32 counts of Adam and the lr schedule
    assert baseline.accumulator == 0
    encoders = {name: _torch_module(tiny, name) for name in ("vae", "text_encoder", "text_encoder_2")}
    assert baseline.encoders == 4 * sum(_count(m.named_parameters()) for m in encoders.values())
    pairs, res = 2, 32
    assert baseline.batch == pairs * (2 * res * res * 3 * 4 + 2 * 77 * 4 + 2 * 6 * 4)
    last = f"encoder.layers.{encoders['text_encoder'].config.num_hidden_layers - 1}."
    never_read = {"vae": ("decoder.", "post_quant_conv."),  # the step only encodes
                  "text_encoder": (last, "final_layer_norm.")}  # SDXL reads the penultimate layer
    unused = 4 * sum(_count(encoders[name].named_parameters())
                     - _count(encoders[name].named_parameters(), skip=prefixes)
                     for name, prefixes in never_read.items())
    assert baseline.step_and_key == 4 + 8 + 4  # int32 step, two uint32 key words, int32 micro-step index
    assert baseline.arguments == baseline.held - unused
    assert baseline.unused == unused
    assert baseline.peak == baseline.held + baseline.outputs - baseline.aliased + baseline.temporaries


@pytest.mark.slow
def test_sharding_remat_and_micro_batch_show_in_the_plan(tiny, baseline):
    sharded = _plan(tiny, mesh="data=2,fsdp=4")
    assert sharded.policy_params < baseline.policy_params / 2  # most bytes are in kernels split over fsdp
    assert sharded.batch == baseline.batch  # 2 pairs per device either way
    remat = _plan(tiny, **{"model.remat": "full"})
    # The recomputed forward shows in the FLOPs (its memory saving: test_remat_lowers_the_temporaries_...).
    assert remat.flops_per_device > 1.1 * baseline.flops_per_device
    lora = _plan(tiny, **{"model.lora_rank": 4})
    assert lora.reference == baseline.reference  # the base UNet, frozen, serves as the reference
    assert lora.policy_params < baseline.policy_params / 10 and lora.optimizer_state < baseline.optimizer_state / 10
    bigger = _plan(tiny, **{"dpo.pairs_per_device": 4})
    assert bigger.temporaries > baseline.temporaries
    assert bigger.flops_per_device == pytest.approx(2 * baseline.flops_per_device, rel=0.1)
    small = dataclasses.replace(baseline, device_memory=baseline.peak - 1)
    assert baseline.fits and not small.fits
    assert "does NOT fit" in small.report() and "fits in 16 GiB" in baseline.report()
    assert baseline.device_memory == 16 * GIB


@pytest.mark.slow
def test_the_dumped_buffer_assignment_gives_memory_analysis_numbers(tiny, tmp_path):
    """The plan stops XLA after its buffer assignment and reads the dump; a complete compile of the same step
    (in this process: 8 test devices, default XLA flags) reports the same bytes through ``memory_analysis``,
    and its per-device FLOPs agree with the whole step's cost before partitioning divided by the devices."""
    config = load_config(CONFIG, _overrides(tiny, **{"model.remat": "full"}))
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2])
    _, program, _ = abstract_step(config, mesh, tiny)
    lowered = program.lower()
    jax.config.update("jax_enable_compilation_cache", False)  # as the plan worker: a cache hit would not dump
    try:
        compiled = lowered.compile(compiler_options=dump_options(tmp_path))
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    expected = compiled.memory_analysis()
    assert read_dumped_memory(tmp_path, compile_done=True) == {
        "arguments": expected.argument_size_in_bytes, "outputs": expected.output_size_in_bytes,
        "aliased": expected.alias_size_in_bytes, "temporaries": expected.temp_size_in_bytes}
    per_device = compiled.cost_analysis()["flops"]
    assert lowered.cost_analysis()["flops"] / 2 == pytest.approx(per_device, rel=0.03)


def test_the_plan_stops_waiting_once_the_buffer_assignment_is_dumped(tmp_path):
    """XLA:CPU goes on after its buffer assignment (SDXL: more than 15 minutes building its run-time graph);
    the worker returns as soon as the dump is complete, while the compile still runs."""
    graph_built = threading.Event()

    class SlowCompile:  # stands in for jax's Lowered: dumps, then "builds the run-time graph" until released
        def compile(self, compiler_options):
            dump = Path(compiler_options["xla_dump_to"])
            dump.mkdir()
            (dump / f"module_0001.jit_update{ASSIGNMENT_SUFFIX}").write_text(
                "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}, maybe-live-out:\n"
                "allocation 1: size 8, parameter 1, shape |f32[2]| at ShapeIndex {}:\n"
                "allocation 2: size 32, thread-local:\nallocation 3: size 128, preallocated-temp:\n")
            (dump / f"module_0001.jit_update{LAST_SUFFIX}").write_text("")
            graph_built.wait()

    memory = compile_until_buffer_assignment(SlowCompile(), tmp_path / "xla", poll_seconds=0.05)
    assert not graph_built.is_set()
    graph_built.set()
    assert memory == {"arguments": 72, "outputs": 64, "aliased": 64, "temporaries": 128}


def _command_temporaries(capsys, tiny: Path, remat: str) -> float:
    """GiB of temporaries `dpojax plan` reports (its compile process runs with the plan's XLA flags)."""
    args = ["plan", str(CONFIG), "--mesh", "fsdp=2", "--device-memory", "16",
            *_overrides(tiny, **{"data.resolution": 64, "model.remat": remat})]
    assert cli.main(args) == 0
    return float(re.search(r"temporaries \(XLA\)\s+([\d.]+) GiB", capsys.readouterr().out).group(1))


@pytest.mark.slow
def test_remat_lowers_the_temporaries_in_the_plan_command(capsys, tiny):
    """With per-block remat each UNet block keeps only its inputs for the backward pass; with full remat each
    resnet and transformer layer does, so less is live at once. XLA:CPU by itself merges the recomputation back
    into the forward pass (no saving at all); the plan's flags keep remat's barriers, as GPU/TPU compilers do,
    so the saving shows (here on the tiny UNet at 64 px)."""
    none, block, full = (_command_temporaries(capsys, tiny, remat) for remat in ("none", "block", "full"))
    assert full < 0.8 * block and block < 0.8 * none


def test_the_plan_is_the_accelerators_program_on_any_mesh(tiny, baseline):
    """Data parallel or FSDP, the plan lowers what a GPU runs (no CPU-only per-device gradients): the UNet
    FLOPs per device (the step on cached latents and text embeddings runs the UNets alone) agree with each
    other and with the model count of ``dpojax.flops`` (8 forwards per pair), and the report prints them to
    three significant digits."""
    from dpojax.bench import unet_forwards_per_pair, unet_image_flops
    from dpojax.plan import flops_per_device
    from dpojax.train.harness import Setup

    unets_only = {"data.cache_dir": tiny / "no-cache-needed"}  # the plan reads no data, only the batch's shapes
    config = load_config(CONFIG, _overrides(tiny, **unets_only))
    model = unet_forwards_per_pair(config) * 2 * unet_image_flops(Setup.build(config, weights="none"))
    planned = []
    for data, fsdp in ((2, 1), (1, 2)):
        mesh = parallel.make_mesh(data=data, fsdp=fsdp, tensor=1, devices=jax.devices()[:2])
        planned.append(flops_per_device(abstract_step(config, mesh, tiny)[1].lower(), 2))
    assert planned[0] == pytest.approx(planned[1], rel=0.05)
    assert planned[0] == pytest.approx(model, rel=0.05)
    tiny_flops = dataclasses.replace(baseline, flops_per_device=planned[0])
    printed = re.search(r"FLOPs per optimizer micro-step: (\S+) TFLOP per device", tiny_flops.report()).group(1)
    assert len(printed.lstrip("0.")) == 3 and float(printed) == pytest.approx(planned[0] / 1e12, rel=5e-3)


def test_the_planned_program_has_no_cpu_only_paths(tiny):
    """On a data-parallel mesh the planned DPO step has no flat fp32 gradient buffer (the CPU path's one
    all-reduce: an f32 vector of every parameter), and the D3PO update runs its trained denoising steps as a
    loop, as GPU and TPU do, where the CPU program traces them one after another."""
    mesh = parallel.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
    setup, program, _ = abstract_step(load_config(CONFIG, _overrides(tiny)), mesh, tiny)
    size = sum(x.size for x in jax.tree.leaves(setup.params))
    assert setup.gradient_mesh is None and f"tensor<{size}xf32>" not in program.lower().as_text()
    d3po = _objective_config(tiny, "d3po", **{"d3po.num_steps": 4})  # two trained steps of four
    for platform, loops in (("gpu", True), ("cpu", False)):
        _, program, _ = abstract_step(d3po, mesh, tiny, platform)
        assert _scans_convolutions(jax.make_jaxpr(program.jitted)(*program.args).jaxpr) == loops, platform


def _scans_convolutions(jaxpr, in_scan: bool = False) -> bool:
    """Whether a ``scan`` of ``jaxpr`` (at any depth) runs convolutions: the UNet inside a loop."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and in_scan:
            return True
        inner = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
        for sub in inner:
            if _scans_convolutions(getattr(sub, "jaxpr", sub), in_scan or eqn.primitive.name == "scan"):
                return True
    return False


# ------------------------------------------------------------------- the plan counts what the trainer holds

D3PO_CONFIG = Path(__file__).parents[1] / "configs" / "tiny_d3po_brightness.yaml"
OBJECTIVES = {  # (config, overrides) of each kind of run the plan must agree with
    "dpo": (CONFIG, {}),
    "sft": (CONFIG, {"loss.type": "sft"}),
    "lora-dpo": (CONFIG, {"model.lora_rank": 4}),
    "d3po": (D3PO_CONFIG, {"d3po.num_steps": 2, "d3po.timestep_fraction": 0.5, "d3po.train_batch_size": 2,
                           "d3po.sample_batch_size": 2}),
}


def _objective_config(tiny: Path, name: str, **extra):
    path, overrides = OBJECTIVES[name]
    values = {"model.pretrained": tiny, "mesh.data": 2, "mesh.fsdp": 4, **overrides, **extra}
    return load_config(path, [f"{k}={v}" for k, v in values.items()])


def _bytes_on(device, tree) -> int:
    """Bytes of ``tree``'s real arrays that live on ``device``."""
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
               if shard.device == device)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_the_plans_shardings_and_bytes_are_the_trainers_real_state(tiny, name):
    """One code path: the planner's shape-only setup is the trainer's ``Setup.build`` with weights="none", its
    state ``eval_shape`` of the trainer's init. Every leaf's sharding equals the real state's, and the plan's
    byte rows equal what a device really holds of the trainer's state and frozen models."""
    from dpojax.train.harness import Setup

    config = _objective_config(tiny, name)
    mesh = parallel.make_mesh(2, 4, 1)
    real = Setup.build(config, mesh=mesh)
    state = real.init_state()
    planned, program, _ = abstract_step(config, mesh, tiny)
    abstract_state = planned.abstract_state()
    assert jax.tree.structure(abstract_state) == jax.tree.structure(state)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, abstract_state)) == \
        jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, planned.abstract_frozen())) == \
        jax.tree.leaves(jax.tree.map(lambda x: x.sharding, real.frozen))
    held = held_bytes(planned, program)
    device = mesh.devices.flat[0]
    assert held["policy_params"] == _bytes_on(device, state.params) > 0
    assert held["optimizer_state"] == _bytes_on(device, state.opt_state)
    assert held["reference"] == _bytes_on(device, real.frozen.get("reference"))
    assert held["encoders"] == _bytes_on(device, {k: v for k, v in real.frozen.items() if k != "reference"})
    assert (held["reference"] == 0) == (name == "sft")  # SFT needs no reference; LoRA's is the frozen base


@pytest.mark.slow
def test_plan_command_plans_a_d3po_step(capsys, tiny):
    """`dpojax plan` on a D3PO config compiles D3PO's update (the objective's own program) in its worker."""
    _, overrides = OBJECTIVES["d3po"]
    args = ["plan", str(D3PO_CONFIG), "--mesh", "fsdp=2", f"model.pretrained={tiny}",
            *(f"{k}={v}" for k, v in overrides.items())]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("d3po step, mesh data=1,fsdp=2,tensor=1 (2 devices), 2 pair(s) per device"), out
    assert re.search(r"policy parameters \(trained\)\s+0\.0\d\d GiB", out) and "fits in 16 GiB" in out
