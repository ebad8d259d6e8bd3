"""AI feedback and your own pairs: ``dpojax data relabel``, ``dpojax data generate`` and JSONL pairs for prepare.

- On the synthetic shards (the brighter image wins) a relabel by ``brightness`` reproduces the original labels on
  at least 95% of the non-tie pairs, its counts add up, a scorer preferring darker images flips them, and
  equal scores are dropped as ties.
- generate on the tiny SDXL pipeline writes winner-first pairs that prepare reads; ``--pairs all --margin M``
  keeps exactly the pairs whose scores differ by more than M.
- A JSONL file of pairs prepares, a row with a missing image is skipped and counted, a row missing a key is a
  one-line error naming its line.
- A scorer failing midway leaves no output folder; bad input is a one-line error naming the culprit.
"""

import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import decode_image, prepared_examples, shard_rows
from PIL import Image

from dpojax.cli import main
from dpojax.data.pickapic import prepare_pickapic
from dpojax.data.schema import PICKAPIC_SCHEMA, split_files
from dpojax.data.scored_pairs import RELABEL_COUNTS, relabel_pickapic
from dpojax.data.synth import write_synthetic_pickapic
from dpojax.scorers.base import Scorer
from dpojax.scorers.proxies import brightness
from dpojax.scorers.registry import make_scorer

ROWS, TIES, CORRUPT = 80, 8, 2
PROMPTS = ["a cat", "a red barn", "a lighthouse at night"]
K = 3
SAMPLER = ["--num-steps", "2", "--guidance", "5", "--resolution", "16", "--batch-size", "9"]


def _one_line_error(capsys, culprit: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpojax data: error:") and culprit in err, err


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    report = write_synthetic_pickapic(out, ROWS, seed=0, tie_fraction=TIES / ROWS, corrupt_images=CORRUPT)
    assert report.ties["train"] == TIES
    return out


@pytest.fixture(scope="module")
def relabeled(synth, tmp_path_factory):
    return relabel_pickapic(synth, tmp_path_factory.mktemp("relabel") / "out", make_scorer("brightness"))


def test_relabel_by_brightness_reproduces_the_synthetic_labels(synth, relabeled, tmp_path):
    c = relabeled.counts
    assert set(c) == set(RELABEL_COUNTS)
    assert c["read"] == c["kept"] + c["ties_dropped"] + c["unreadable"]
    assert c["kept"] == c["agreeing"] + c["flipped"] + c["original_ties"]
    total_rows = sum(len(shard_rows(synth, s)) for s in ("train", "validation", "validation_unique"))
    assert c["read"] == total_rows and c["unreadable"] == CORRUPT
    print(f"brightness relabel agreement with the synthetic labels: {relabeled.agreement:.1%} "
          f"({c['agreeing']} of {c['agreeing'] + c['flipped']} non-tie pairs); counts {c}")
    assert relabeled.agreement >= 0.95
    assert json.loads((relabeled.out / "relabel_report.json").read_text())["counts"] == c

    # Same shard names and schema; every pair winner-first by the scorer, labels and best uid to match.
    assert sorted(p.name for p in (relabeled.out / "data").iterdir()) == sorted(
        p.name for p in (synth / "data").iterdir())
    rows = shard_rows(relabeled.out)
    assert pq.read_schema(split_files(relabeled.out, "train")[0]).names == PICKAPIC_SCHEMA.names
    for row in rows:
        assert (row["label_0"], row["label_1"]) == (1.0, 0.0) and row["best_image_uid"] == row["image_0_uid"]
        assert brightness(decode_image(row["jpg_0"])[None]) > brightness(decode_image(row["jpg_1"])[None])

    report = prepare_pickapic(relabeled.out, tmp_path, splits=("train",))
    assert report.counts["train"]["kept"] == len(rows) and "tie" not in report.counts["train"]


def test_a_scorer_preferring_darker_images_flips_the_labels(synth, relabeled, tmp_path):
    darkness = Scorer("darkness", lambda images, prompts: -brightness(images))
    flipped = relabel_pickapic(synth, tmp_path / "dark", darkness)
    assert flipped.counts["flipped"] == relabeled.counts["agreeing"] and flipped.counts["agreeing"] == 0
    assert flipped.agreement == 0.0
    for row in shard_rows(flipped.out):
        assert brightness(decode_image(row["jpg_0"])[None]) < brightness(decode_image(row["jpg_1"])[None])


def test_equal_scores_are_ties_and_dropped(synth, tmp_path):
    same = Scorer("constant", lambda images, prompts: np.zeros(len(images)))
    constant = relabel_pickapic(synth, tmp_path / "out", same)
    assert constant.counts["kept"] == 0 and constant.agreement is None
    assert constant.counts["ties_dropped"] == constant.counts["read"] - CORRUPT
    assert shard_rows(constant.out) == []


def test_a_scorer_failing_midway_leaves_no_output(synth, tmp_path):
    calls = []

    def fails_on_the_third_call(images, prompts):
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("scorer crashed")
        return brightness(images)

    with pytest.raises(ValueError, match="scorer crashed"):
        relabel_pickapic(synth, tmp_path / "out", Scorer("flaky", fails_on_the_third_call), batch_size=8)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder


def test_bad_input_is_a_one_line_error_naming_it(synth, tmp_path, tiny_sdxl, capsys):
    (tmp_path / "taken").mkdir()
    prompts, empty = tmp_path / "prompts.txt", tmp_path / "empty.txt"
    prompts.write_text("a cat\n")
    empty.write_text("\n  \n")
    cases = [(["relabel", tmp_path / "nowhere", tmp_path / "out", "--scorer", "brightness"], "nowhere"),
             (["relabel", synth, tmp_path / "out", "--scorer", "sharpness"], "'sharpness'"),
             (["relabel", synth, tmp_path / "taken", "--scorer", "brightness"], "taken"),
             (["generate", tmp_path / "no-model", "--prompts", prompts, "--scorer", "brightness", "--out",
               tmp_path / "out"], "no-model"),
             (["generate", tiny_sdxl, "--prompts", empty, "--scorer", "brightness", "--out", tmp_path / "out"],
              "empty.txt"),
             (["generate", tiny_sdxl, "--prompts", prompts, "--scorer", "sharpness", "--out", tmp_path / "out"],
              "'sharpness'")]
    for args, culprit in cases:
        assert main(["data", *map(str, args)]) == 2
        _one_line_error(capsys, culprit)
    assert not (tmp_path / "out").exists()


def test_generate_writes_winner_first_pairs_that_prepare_reads(tiny_sdxl, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["data", "generate", str(tiny_sdxl), "--prompts", str(tmp_path / "prompts.txt"), "--images-per-prompt",
              str(K), "--scorer", "brightness", *SAMPLER]
    assert main([*common, "--out", str(tmp_path / "best")]) == 0
    report = json.loads((tmp_path / "best" / "generate_report.json").read_text())
    scores = [np.asarray(p["scores"]) for p in report["per_prompt"]]
    assert len(scores) == len(PROMPTS) and report["counts"]["pairs"] == len(PROMPTS)
    rows = shard_rows(tmp_path / "best")
    for row, prompt, s in zip(rows, PROMPTS, scores, strict=True):
        assert row["caption"] == prompt and (row["label_0"], row["label_1"]) == (1.0, 0.0)
        winner, loser = brightness(decode_image(row["jpg_0"])[None])[0], brightness(decode_image(row["jpg_1"])[None])[0]
        assert (winner, loser) == (s.max(), s.min()) and winner > loser  # PNG: the stored pixels are the scored ones
    prepared = prepare_pickapic(tmp_path / "best", tmp_path / "tfds", splits=("train",))
    assert len(prepared_examples(prepared)) == len(PROMPTS)

    # Same seeds, so the same images and scores: a margin at the median difference keeps the pairs above it.
    differences = [abs(s[a] - s[b]) for s in scores for a, b in itertools.combinations(range(K), 2)]
    margin = float(np.median(differences))
    assert main([*common, "--pairs", "all", "--margin", str(margin), "--out", str(tmp_path / "all")]) == 0
    rows = shard_rows(tmp_path / "all")
    expected = sum(d > margin for d in differences)
    assert 0 < len(rows) == expected < len(differences)
    for row in rows:
        winner, loser = brightness(decode_image(row["jpg_0"])[None])[0], brightness(decode_image(row["jpg_1"])[None])[0]
        assert winner - loser > margin


def test_prepare_reads_your_own_jsonl_pairs(tmp_path):
    images = tmp_path / "pairs" / "images"
    images.mkdir(parents=True)
    for name, level in (("bright", 200), ("dark", 40), ("grey", 120)):
        Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(images / f"{name}.png")
    lines = [{"caption": "a bright room", "winner": "images/bright.png", "loser": "images/dark.png"},
             {"caption": "a grey day", "winner": str(images / "grey.png"), "loser": "images/dark.png"},  # absolute
             {"caption": "a lost file", "winner": "images/missing.png", "loser": "images/dark.png"}]
    jsonl = tmp_path / "pairs" / "pairs.jsonl"
    jsonl.write_text("\n".join(map(json.dumps, lines)) + "\n")

    report = prepare_pickapic(jsonl, tmp_path / "tfds")
    assert report.counts["train"] == {"rows": 3, "kept": 2, "missing_image": 1}
    examples = prepared_examples(report)
    assert [ex["caption"].decode() for ex in examples] == ["a bright room", "a grey day"]
    assert examples[0]["jpg_w"] == (images / "bright.png").read_bytes()
    assert examples[1]["jpg_l"] == (images / "dark.png").read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*map(json.dumps, lines[:2]), json.dumps({"caption": "x", "winner": "a.png"})]))
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: missing key 'loser'") as err:
        prepare_pickapic(bad, tmp_path / "tfds_bad")
    assert "\n" not in str(err.value) and not (tmp_path / "tfds_bad").exists()
