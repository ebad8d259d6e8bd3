"""`dpojax bench --scorers` times each model-based scorer (JAX) against its PyTorch original on the same images,
through the CLI, on tiny random models written as the originals publish them.

No timing is asserted: speed claims live in the benchmark's output, not in tests. That both sides computed the same
scores is (the bench prints their relative difference).
"""

import re
import sys

import pytest
import torch_oracles
from helpers import (
    aesthetic_head_state,
    tiny_clip_vision,
    write_clip_folder,
    write_hps_checkpoint,
    write_hps_processor,
    write_image_reward,
)
from safetensors.numpy import save_file

from dpojax.cli import main

pytestmark = pytest.mark.slow
NUMBER = r"[0-9.]+"
SCORERS = {  # what each original runs, as the bench describes it
    "pickscore": "transformers CLIPModel, CLIPTokenizer, CLIPImageProcessorPil",
    "aesthetic": "transformers CLIPVisionModelWithProjection, CLIPImageProcessorPil, the LAION MLP head",
    "hps": r"open_clip CLIP, its tokenizer, HPSv2's transform \(torchvision\)",
    "imagereward": "image-reward's BLIP \\+ MLP, its _transform and BertTokenizer, score_gard on batches",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The config overrides (the scorers section) and --scorer-options (HPS's files, the batch size) naming a tiny
    PickScore, aesthetic predictor, HPS and ImageReward."""
    torch_oracles.open_clip()
    torch_oracles.image_reward()
    root = tmp_path_factory.mktemp("bench_scorers")
    _, pickscore_processor = write_clip_folder(root / "pickscore", "gelu")
    tiny_clip_vision().save_pretrained(root / "clip")
    save_file(aesthetic_head_state(dim=24), str(root / "head.safetensors"))
    (root / "hps").mkdir()
    _, checkpoint, config = write_hps_checkpoint(root / "hps", "gelu", seed=0)
    _, reward_model, reward_tokenizer = write_image_reward(root / "imagereward", "one_head")
    overrides = [f"scorers.pickscore_model={root / 'pickscore' / 'model'}",
                 f"scorers.pickscore_processor={pickscore_processor}", f"scorers.clip_model={root / 'clip'}",
                 f"scorers.aesthetic_head={root / 'head.safetensors'}", f"scorers.imagereward_model={reward_model}",
                 f"scorers.imagereward_tokenizer={reward_tokenizer}"]
    options = [f"hps_checkpoint={checkpoint}", f"hps_model_config={config}",
               f"hps_processor={write_hps_processor(root / 'hps_processor')}", "batch_size=2"]
    return overrides, [arg for option in options for arg in ("--scorer-option", option)]


def bench_args(files, scorers, *extra):
    overrides, options = files
    return ["bench", "configs/tiny_sdxl_dpo.yaml", *overrides, "--scorers", scorers, *options, "--scorers-only",
            "--scorer-images", "3", "--scorer-size", "40", "--iters", "1", "--rounds", "1", "--warmup", "0", *extra]


def test_bench_times_each_scorer_against_its_original(files, capsys):
    """Config files and --scorer-options; 3 images in batches of 2, so the JAX side pads its last batch."""
    assert main(bench_args(files, ",".join(SCORERS))) == 0
    out = capsys.readouterr().out
    assert re.search(r"dpojax bench scorers: 3 random 40x40 images, 6 prompts of 0 to \d+ characters; JAX on 1 x ",
                     out), out
    assert "DPO step" not in out  # --scorers-only
    for name, setting in SCORERS.items():
        assert re.search(rf"scorer {name} \[jax\] +first call \(compiles\) {NUMBER} s; call median {NUMBER} ms "
                         rf"\(min {NUMBER} ms, n=1\); {NUMBER} images/s\n", out), out
        torch_line = re.search(rf"scorer {name} \[torch\] call median {NUMBER} ms .*; {NUMBER} images/s; {setting}; "
                               rf"torch \S+ on cpu, float32, \d+ threads, batches of 2; scores differ from JAX's by "
                               rf"(\S+)\n", out)
        assert torch_line, out
        assert float(torch_line.group(1)) <= 1e-4  # both sides scored the same images with the same weights
        assert re.search(rf"scorer {name} ratio jax/torch = {NUMBER} \(median of rounds: {NUMBER}; time per call, "
                         rf"below 1: JAX faster\)", out), out


def test_a_missing_original_is_skipped_and_jax_still_timed(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    assert main(bench_args(files, "hps,aesthetic")) == 0
    out = capsys.readouterr().out
    assert re.search(rf"scorer hps \[jax\] +first call \(compiles\) {NUMBER} s; call median {NUMBER} ms", out), out
    assert re.search(r"scorer hps \[torch\] skipped: PyTorch side not timed \(open_clip is not installed; HPSv2's "
                     r"original needs open-clip-torch and torchvision\)", out), out
    assert "scorer hps ratio" not in out
    assert re.search(rf"scorer aesthetic ratio jax/torch = {NUMBER}", out), out


def test_scorer_arguments_are_checked_first(capsys):
    """One-line errors: an option no scorer takes (before anything runs), a scorer's missing file, no --scorers."""
    assert main(["bench", "configs/tiny_sdxl_dpo.yaml", "--scorers", "pickscore,hps", "--scorer-option",
                 "nothing=1"]) == 2
    assert capsys.readouterr().err.strip() == ("dpojax bench: error: bench: --scorer-option nothing is taken by none "
                                               "of the scorers pickscore,hps")
    assert main(["bench", "configs/tiny_sdxl_dpo.yaml", "--scorers", "clip_score", "--scorers-only"]) == 2
    assert re.search(r"bench: scorer 'clip_score' needs clip_model=.* \(give it with --scorer-option KEY=VALUE or in "
                     r"the config's scorers section\)", capsys.readouterr().err)
    assert main(["bench", "configs/tiny_sdxl_dpo.yaml", "--scorers-only"]) == 2
    assert "--scorers-only needs --scorers" in capsys.readouterr().err
