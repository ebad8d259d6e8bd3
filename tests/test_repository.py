"""The repository as a newcomer finds it: every path the code and docs cite is inside it, every shipped config
validates and names only files that exist, and a non-editable install finds its shipped data."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from dpojax.config import load_config
from dpojax.demo import DEMO_MODEL, DEMO_PAIRS
from dpojax.train.d3po import SHIPPED_PROMPTS

TOP_LEVEL = ("dpojax", "configs", "tests", "launch", "docs", ".ci")
CITED = re.compile(r"(?<![\w./-])(?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")/[\w./<>{}*-]*")
OUTSIDE = re.compile(r"\.\./shared|(?<![\w-])reference/\w|\bdesign\.md\b")


def _texts():
    files = [p for p in REPO.rglob("*") if p.is_file() and not any(
        part.startswith(".") and part != ".ci" or part in ("__pycache__", "build") or part.endswith(".egg-info")
        for part in p.relative_to(REPO).parts)]
    return [(p, p.read_text(errors="replace")) for p in files if p.suffix in (".py", ".md", ".yaml", ".sh",
                                                                            ".sbatch", ".html", ".toml", "")]


def test_every_cited_path_is_inside_the_repository_and_exists():
    outside, missing = [], []
    for path, text in _texts():
        where = path.relative_to(REPO)
        outside += [f"{where}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
        for m in CITED.finditer(text):
            cited = re.split(r"[<{*]", m.group(0))[0].rstrip("./-")  # a placeholder ends the real part
            if cited.count("/") and not (REPO / cited).exists():
                missing.append(f"{where}: {m.group(0)}")
    assert not outside, outside
    assert not missing, missing


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
INPUT_PATHS = ("model.pretrained", "model.vae", "data.data_dir", "data.cache_dir", "train.eval_prompt_file",
               *(f"scorers.{key}" for key in ("clip_model", "clip_processor", "aesthetic_head", "pickscore_model",
                                              "pickscore_processor")))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_name_only_files_that_exist(path):
    """Model and data folders are the user's (null, set on the command line) or what `dpojax demo` makes
    (demo/tiny-sdxl, demo/pairs: the tiny configs); prompt files are shipped with the package."""
    config = load_config(path)
    demo_inputs = {f"demo/{DEMO_MODEL}", f"demo/{DEMO_PAIRS}"}
    for key in INPUT_PATHS:
        section, name = key.split(".")
        if section not in config.sections():
            continue
        value = getattr(getattr(config, section), name)
        assert value is None or value in demo_inputs, f"{path.name}: {key}={value!r}"
    if config.objective == "d3po" and config.d3po.prompt_file is not None:
        from dpojax.train.d3po import load_prompts

        assert len(load_prompts(config)) > 0
    if config.model.pretrained is None:  # dpojax plan reads the shipped architecture
        from dpojax.plan import architecture_folder

        assert (architecture_folder(config) / "model_index.json").is_file()


def test_the_papers_animal_prompts_ship():
    animals = SHIPPED_PROMPTS.joinpath("animals.txt").read_text().split()
    assert len(animals) == 45 and animals[:3] == ["cat", "dog", "horse"] and animals[-1] == "kangaroo"


@pytest.mark.slow
def test_a_non_editable_install_plans_with_its_shipped_architecture(tmp_path):
    """`pip install` of the wheel (not editable) into a fresh venv, run from an empty folder: `dpojax plan`
    finds the SD1.5 architecture inside the installed package. The venv borrows this environment's
    dependencies through a .pth line (that adds their folder without running its .pth files, so the editable
    dpojax of this environment stays invisible); SFT at 64 px keeps the compile short."""
    wheels, venv, empty = tmp_path / "wheels", tmp_path / "venv", tmp_path / "empty"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "jax").is_dir())
    (Path(site) / "dependencies.pth").write_text(f"{deps}\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(next(wheels.glob("dpojax-*.whl")))], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    empty.mkdir()
    where = subprocess.run([python, "-c", "import dpojax; print(dpojax.__file__)"], capture_output=True, text=True,
                           cwd=empty, check=True).stdout
    assert where.startswith(site), where
    plan = subprocess.run([venv / "bin" / "dpojax", "plan", REPO / "configs" / "sd15_dpo.yaml", "--mesh", "fsdp=1",
                           "data.resolution=64", "dpo.grad_accum=1", "loss.type=sft"], capture_output=True, text=True,
                          cwd=empty, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "dpo step, mesh data=1,fsdp=1,tensor=1 (1 devices)" in plan.stdout and "fits in 16 GiB" in plan.stdout
    assert list(empty.iterdir()) == []  # nothing written where it ran
