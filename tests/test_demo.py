"""The README's main command: `dpojax demo` runs every stage and leaves the diffusers folder and the PNG."""

import json

import pytest
from PIL import Image

from dpojax import cli

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parents[1])  # the config path is relative to the repo
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "3"]) == 0
    final = out / "run" / "final"
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert Image.open(out / "diffusers_sample.png").mode == "RGB"
    first = capsys.readouterr().out
    assert all(f"[{i}/5]" in first for i in range(1, 6)), first
    # Rerun: finished stages are skipped, training resumes at its last step instead of starting over.
    assert cli.main(["demo", "--out", str(out), "--steps", "3"]) == 0
    again = capsys.readouterr().out
    assert "[1/5]" not in again and "[2/5]" not in again and "[3/5]" not in again
    assert "resumed from" in again
