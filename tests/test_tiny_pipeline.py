"""`dpojax init-tiny` folders are real diffusers pipelines, and the CLI samples from them."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from dpojax.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl_folder(tiny_sdxl):
    return tiny_sdxl


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_diffusers_loads_and_generates(arch, sdxl_folder, tiny_sd15):
    folder = sdxl_folder if arch == "sdxl" else tiny_sd15
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    out = pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_init_tiny_refuses_an_existing_path(sdxl_folder, capsys):
    before = sorted(p.name for p in sdxl_folder.iterdir())
    assert main(["init-tiny", str(sdxl_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err
    assert sorted(p.name for p in sdxl_folder.iterdir()) == before


def test_cli_sample_writes_pngs(sdxl_folder, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", str(sdxl_folder), "--prompt", "a cat", "--prompt", "a dog", "--out", str(out),
            "--steps", "3", "--seed", "1"]
    assert main(args) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 2
    pixels = [np.asarray(Image.open(p)) for p in images]
    assert pixels[0].shape == (64, 64, 3) and not np.array_equal(pixels[0], pixels[1])


def test_cli_sample_missing_model_is_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
