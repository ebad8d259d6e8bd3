"""Import from and export to diffusers/transformers folders, checked by the PyTorch loaders; atomicity."""

import copy
import hashlib
import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import perturb_, rel_err
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dpojax import parallel
from dpojax.models import UNet2DConditionModel
from dpojax.tiny import UNET_SDXL, text_encoder_config
from dpojax.weights import io
from dpojax.weights.pretrained import PretrainedMixin


def with_pretrained(cls, layout):
    """The model class with ``PretrainedMixin``, added under the same name if its bases lack it."""
    if issubclass(cls, PretrainedMixin):
        return cls
    return type(cls.__name__, (cls, PretrainedMixin), {"weights_layout": layout})


Unet = with_pretrained(UNet2DConditionModel, "diffusers")


@pytest.fixture(scope="module")
def torch_unet():
    torch.manual_seed(0)
    return perturb_(diffusers.UNet2DConditionModel(**UNET_SDXL).eval(), seed=1)


@pytest.fixture(scope="module")
def saved(torch_unet, tmp_path_factory):
    """The torch UNet saved by diffusers in every supported layout: name -> (folder, load kwargs, model)."""
    root = tmp_path_factory.mktemp("diffusers")
    half = copy.deepcopy(torch_unet).half()
    torch_unet.save_pretrained(root / "plain")
    torch_unet.save_pretrained(root / "sharded", max_shard_size="300KB")
    half.save_pretrained(root / "fp16", variant="fp16")
    half.save_pretrained(root / "fp16-sharded", variant="fp16", max_shard_size="300KB")
    return {"plain": (root / "plain", {}, torch_unet),
            "sharded": (root / "sharded", {}, torch_unet),
            "fp16": (root / "fp16", {"variant": "fp16"}, half.float()),
            "fp16-sharded": (root / "fp16-sharded", {"variant": "fp16"}, half.float())}


def _torch_forward(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]),
                     torch.randn(2, 7, 64, generator=gen),
                     added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=gen),
                                        "time_ids": 100 * torch.rand(2, 6, generator=gen)}).sample.numpy()


@pytest.mark.parametrize("layout,use_mesh", [("plain", False), ("sharded", True), ("fp16", False),
                                             ("fp16-sharded", True)])
def test_diffusers_round_trip(saved, tmp_path, layout, use_mesh):
    folder, kwargs, original = saved[layout]
    mesh = parallel.make_mesh(data=2, fsdp=4) if use_mesh else None
    unet = Unet.from_pretrained(folder.parent, subfolder=folder.name, mesh=mesh, **kwargs)
    if use_mesh:
        assert "fsdp" in unet.conv_in.kernel.get_value().sharding.spec
    unet.save_pretrained(tmp_path / "export")

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["_diffusers_version"] == "0.42.1"
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export").eval()
    expected = {k: v.numpy() for k, v in original.state_dict().items()}
    exported = load_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == expected.keys()
    assert all(np.array_equal(exported[k], expected[k]) for k in expected)
    assert rel_err(_torch_forward(reloaded), _torch_forward(original)) <= 1e-5


class _SpyOpen:
    """Stands in for ``safe_open`` and records every block read through ``get_slice(key)[index]``."""

    def __init__(self, real_open, reads):
        self.real_open, self.reads = real_open, reads

    def __call__(self, *args, **kwargs):
        self.context = self.real_open(*args, **kwargs)
        return self

    def __enter__(self):
        self.handle = self.context.__enter__()
        return self

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)

    def get_slice(self, key):
        tensor, reads = self.handle.get_slice(key), self.reads

        class Slice:
            def __getitem__(self, index):
                reads.append(tensor[index])
                return reads[-1]

        return Slice()


def test_sharded_import_reads_each_slice_once(saved, monkeypatch):
    """Each device's slice is read from the file, never the whole tensor per device."""
    reads = []
    monkeypatch.setattr(io, "safe_open", lambda *a, **k: _SpyOpen(safe_open, reads)(*a, **k))
    unet = Unet.from_pretrained(saved["plain"][0], mesh=parallel.make_mesh(data=2, fsdp=4))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))
    assert sum(block.size for block in reads) == n_params
    sharded = [k for k in jax.tree.leaves(nnx.state(unet, nnx.Param)) if not k.sharding.is_fully_replicated]
    assert len(reads) == 4 * len(sharded) + (len(jax.tree.leaves(nnx.state(unet, nnx.Param))) - len(sharded))


def test_param_dtype_and_export_dtype(saved, tmp_path):
    folder, _, original = saved["plain"]
    unet = Unet.from_pretrained(folder, dtype=jnp.bfloat16)
    assert unet.conv_in.kernel.get_value().dtype == jnp.bfloat16
    unet.save_pretrained(tmp_path / "bf16")
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float32)
    exported = load_file(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors")
    assert str(exported["conv_in.weight"].dtype) == "bfloat16"
    assert rel_err(_torch_forward(reloaded.eval()), _torch_forward(original)) < 0.05


def _edited_copy(saved, tmp_path, edit):
    src = saved["plain"][0]
    dst = tmp_path / "edited"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    weights = load_file(src / "diffusion_pytorch_model.safetensors")
    edit(weights)
    save_file(weights, dst / "diffusion_pytorch_model.safetensors")
    return dst


def _one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_mismatched_tensors_are_one_error_naming_them(saved, tmp_path):
    def edit(w):
        del w["conv_in.bias"]
        w["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
        w["extra.weight"] = np.zeros(3, np.float32)

    folder = _edited_copy(saved, tmp_path, edit)
    _one_line_error(ValueError, lambda: Unet.from_pretrained(folder), str(folder),
                    "missing (1): conv_in.bias", "unexpected (1): extra.weight",
                    "conv_out.weight (4, 32, 1, 1) != expected (4, 32, 3, 3)")


def test_legacy_key_names_are_mapped(saved, tmp_path):
    """Old diffusers attention names and a saved ``position_ids`` buffer, as older Hub checkpoints have."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def edit(w):
        for key in list(w):
            for new, old in legacy.items():
                if f".attn1.{new}." in key:
                    w[key.replace(f".attn1.{new}.", f".attn1.{old}.")] = w.pop(key)
        w["embeddings.position_ids"] = np.arange(77)[None]

    folder = _edited_copy(saved, tmp_path, edit)
    assert not any(".attn1.to_" in k for k in load_file(folder / "diffusion_pytorch_model.safetensors"))
    Unet.from_pretrained(folder).save_pretrained(tmp_path / "export")
    exported = load_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    original = load_file(saved["plain"][0] / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == original.keys()
    assert all(np.array_equal(exported[k], original[k]) for k in original)


def test_bad_folders_are_one_line_errors(saved, tmp_path):
    _one_line_error(FileNotFoundError, lambda: Unet.from_pretrained(tmp_path / "nope"), "nope",
                    "does not exist")
    _one_line_error(FileNotFoundError, lambda: Unet.from_pretrained(tmp_path, subfolder="unet"),
                    "no subfolder 'unet'")
    (tmp_path / "noconfig").mkdir()
    _one_line_error(FileNotFoundError, lambda: Unet.from_pretrained(tmp_path / "noconfig"), "no config.json")

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(saved["plain"][0] / "config.json", binary)
    (binary / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    _one_line_error(FileNotFoundError, lambda: Unet.from_pretrained(binary), "only PyTorch .bin weights",
                    "safe_serialization=True")
    _one_line_error(FileNotFoundError, lambda: Unet.from_pretrained(saved["fp16"][0]),
                    "diffusion_pytorch_model.fp16.safetensors", "variant")


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_export_leaves_existing_folder_intact(saved, tmp_path, monkeypatch):
    unet = Unet.from_pretrained(saved["plain"][0])
    target = tmp_path / "export"
    unet.save_pretrained(target)
    (target / "marker.txt").write_text("from the previous export")
    before = _snapshot(target)

    def failing_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        unet.save_pretrained(target)
    with pytest.raises(OSError, match="disk full"):
        unet.save_pretrained(tmp_path / "fresh")
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    monkeypatch.undo()
    unet.save_pretrained(target)  # a successful export replaces the folder whole
    assert not (target / "marker.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_save_pipeline_replaces_one_component(saved, tmp_path):
    base = tmp_path / "base"
    (base / "scheduler").mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (base / "scheduler" / "scheduler_config.json").write_text("{}")
    shutil.copytree(saved["plain"][0], base / "unet")
    (base / "unet" / "stale.txt").write_text("must not survive")

    unet = Unet.from_pretrained(base, subfolder="unet", dtype=jnp.bfloat16)
    io.save_pipeline(base, tmp_path / "out", {"unet": unet})
    out = tmp_path / "out"
    assert (out / "scheduler" / "scheduler_config.json").read_text() == "{}"
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", weights.name]
    assert str(load_file(weights)["conv_in.weight"].dtype) == "bfloat16"
    _one_line_error(ValueError, lambda: io.save_pipeline(base, tmp_path / "out2", {"unte": unet}),
                    "no component 'unte'")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------- transformers CLIP


@pytest.fixture(scope="module")
def clip_models():
    clip_text = pytest.importorskip("dpojax.models.clip_text")
    transformers = pytest.importorskip("transformers")
    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    torch.manual_seed(0)
    plain = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **text_encoder_config(projection=False, hidden_act="quick_gelu", token_ids=ids))).eval()
    projected = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **text_encoder_config(projection=True, hidden_act="gelu", token_ids=ids))).eval()
    models = (("CLIPTextModel", plain, 2), ("CLIPTextModelWithProjection", projected, 3))
    return {name: (with_pretrained(getattr(clip_text, name), "transformers"), getattr(transformers, name),
                   perturb_(model, seed=seed)) for name, model, seed in models}


def _clip_outputs(model):
    ids = torch.tensor([[0, 5, 17, 400, 2, 1, 1], [0, 9, 999, 33, 81, 7, 2]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return [t.numpy() for t in (out[0], out[1], out.hidden_states[-2])]


@pytest.mark.parametrize("name,key_layout", [("CLIPTextModel", "5.x"), ("CLIPTextModel", "4.x"),
                                             ("CLIPTextModelWithProjection", "5.x")])
def test_transformers_round_trip(clip_models, tmp_path, name, key_layout):
    ours, theirs, original = clip_models[name]
    folder = tmp_path / "saved"
    original.save_pretrained(folder)
    if key_layout == "4.x":  # transformers 4.x kept CLIPTextModel's weights under `text_model.`
        weights = load_file(folder / "model.safetensors")
        save_file({f"text_model.{k}": v for k, v in weights.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    ours.from_pretrained(folder).save_pretrained(tmp_path / "export")

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [name] and config["transformers_version"] == "5.23.0"
    exported = load_file(tmp_path / "export" / "model.safetensors")
    expected = {k: v.numpy() for k, v in original.state_dict().items()}
    assert exported.keys() == expected.keys()  # the layout transformers 5.23 itself writes
    reloaded, info = theirs.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info.values()), info
    for got, want in zip(_clip_outputs(reloaded.eval()), _clip_outputs(original), strict=True):
        assert rel_err(got, want) <= 1e-5
