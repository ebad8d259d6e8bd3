"""The prompt sets of ``dpojax eval --prompts`` (fast: no model, no sampling).

- A prepared Pick-a-Pic dataset (synthetic shards through ``prepare_pickapic``) gives the unique captions of its
  split in first-seen order, from any folder level of the dataset; ``--split`` picks another split.
- PartiPrompts (.tsv), one HPSv2 benchmark style (.json) and a folder of styles are read in their published
  formats.
- Every bad input is a one-line ValueError naming the file or folder, also through ``dpojax.cli.main``.
- The CLI hands the prompts of a .tsv or a prepared split to the sampling step.
"""

import json
from pathlib import Path

import pytest
from helpers import prepared_examples

import dpojax.evaluate.run as run
from dpojax.cli import main
from dpojax.data.pickapic import prepare_pickapic
from dpojax.data.synth import write_synthetic_pickapic
from dpojax.evaluate.prompts import read_prompts

# The published layout: a header, tab-separated, an empty Note, a prompt opening with a double quote (as one of
# the real file's does) and one ending with a space.
PARTI = ("Prompt\tCategory\tChallenge\tNote\n"
         "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
         "a shiba inu\tAnimals\tBasic\t\n"
         '"G I G G L E" painted in thick colorful lettering as graffiti\tIllustrations\tWriting & Symbols\t\n'
         "A penguin wearing aviator goggles. \tAnimals\tComplex\t\n")
PARTI_PROMPTS = ["bond", "a shiba inu", '"G I G G L E" painted in thick colorful lettering as graffiti',
                 "A penguin wearing aviator goggles."]
HPS = {"photo.json": ["a photo of a red car", "a dog on a beach"], "anime.json": ["an anime girl, pastel"],
       "concept-art.json": ["a castle in the clouds, concept art"]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``dpojax data prepare`` of small synthetic shards: validation_unique and train (ties dropped)."""
    root = tmp_path_factory.mktemp("prompts")
    write_synthetic_pickapic(root / "src", 6, seed=0, image_size=8, shards=1, eval_rows=16)
    report = prepare_pickapic(root / "src", root / "out", splits=("validation_unique", "train"))
    return root, report


def first_seen(captions) -> list[str]:
    seen = []
    for c in captions:
        if c not in seen:
            seen.append(c)
    return seen


def one_line_error(path, split, *culprits: str) -> str:
    """The ValueError of ``read_prompts(path, split)``, checked to be one line holding every culprit."""
    with pytest.raises(ValueError) as err:
        read_prompts(path, split=split)
    message = str(err.value)
    assert "\n" not in message and all(c in message for c in culprits), message
    return message


def test_a_prepared_split_gives_its_unique_captions_in_first_seen_order(prepared):
    root, report = prepared
    captions = [ex["caption"].decode() for ex in prepared_examples(report, "validation_unique")]
    expected = first_seen(captions)
    assert len(expected) < len(captions)  # the split repeats captions, so de-duplication is exercised
    out = root / "out"
    for folder in (out, out / "pickapic_v2", out / "pickapic_v2" / "default", report.data_dir):
        assert read_prompts(folder) == expected, folder
    train = first_seen(ex["caption"].decode() for ex in prepared_examples(report, "train"))
    assert read_prompts(out, split="train") == train


def test_several_datasets_or_a_missing_split_are_one_line_errors(prepared, tmp_path):
    root, _ = prepared
    one_line_error(root / "out", "test_unique", str(root / "out"),
                   "no split 'test_unique'", "validation_unique, train")
    for drop_ties in (True, False):
        report = prepare_pickapic(root / "src", tmp_path, drop_ties=drop_ties, splits=("validation_unique",))
    one_line_error(tmp_path, None, "several prepared datasets", "pickapic_v2/default/1.0.0",
                   "pickapic_v2/with_ties/1.0.0")
    with_ties = first_seen(ex["caption"].decode() for ex in prepared_examples(report, "validation_unique"))
    assert read_prompts(tmp_path / "pickapic_v2" / "with_ties") == with_ties


def test_parti_prompts_tsv_gives_its_prompt_column(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(PARTI, encoding="utf-8")
    assert read_prompts(path) == PARTI_PROMPTS
    shuffled = tmp_path / "columns.tsv"
    shuffled.write_text("Category\tPrompt\nAnimals\ta corgi\n\nArts\tThe Starry Night\n", encoding="utf-8")
    assert read_prompts(shuffled) == ["a corgi", "The Starry Night"]


def test_hpsv2_benchmark_json_and_folder(tmp_path):
    for name, prompts in HPS.items():
        (tmp_path / name).write_text(json.dumps(prompts, indent=1), encoding="utf-8")
    assert read_prompts(tmp_path / "photo.json") == HPS["photo.json"]
    assert read_prompts(tmp_path) == HPS["anime.json"] + HPS["concept-art.json"] + HPS["photo.json"]


def test_text_files_read_as_before(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    assert read_prompts(path) == ["a cat", "a dog"]


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
    def write(name: str, text: str | bytes):
        path = tmp_path / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
        return path

    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "text_dir").mkdir()
    write("text_dir/prompts.txt", "a cat\n")
    (tmp_path / "hps_dir").mkdir()
    write("hps_dir/anime.json", json.dumps(["ok"]))
    write("hps_dir/photo.json", json.dumps({"prompts": ["x"]}))
    cases = [
        (tmp_path / "missing.tsv", None, "cannot be read"),
        (tmp_path / "missing.json", None, "cannot be read"),
        (tmp_path / "missing.txt", None, "cannot be read"),
        (write("blank.txt", "\n  \n"), None, "holds no prompts"),
        (write("header_only.tsv", "Prompt\tCategory\tChallenge\tNote\n"), None, "holds no prompts"),
        (write("no_column.tsv", "Text\tCategory\nbond\tAbstract\n"), None, "no 'Prompt' column"),
        (write("short_row.tsv", "Category\tPrompt\nAnimals\n"), None, "line 2 has no 'Prompt' field"),
        (write("empty.json", "[]"), None, "holds no prompts"),
        (write("dict.json", '{"prompts": ["a cat"]}'), None, "not a JSON list of prompt strings"),
        (write("mixed.json", '["a cat", 3]'), None, "item 1 is int, not a string"),
        (write("broken.json", '["a cat",'), None, "not valid JSON"),
        (write("latin1.txt", "caf\xe9\n".encode("latin-1")), None, "not UTF-8"),
        (tmp_path / "empty_dir", None, "neither .json prompt files"),
        (tmp_path / "text_dir", None, "neither .json prompt files"),
        (tmp_path / "hps_dir", None, "not a JSON list of prompt strings"),
        (write("split.tsv", PARTI), "train", "a split is chosen only in a prepared Pick-a-Pic dataset"),
    ]
    for path, split, reason in cases:
        culprit = str(tmp_path / "hps_dir" / "photo.json") if path.name == "hps_dir" else str(path)
        one_line_error(path, split, culprit, reason)


@pytest.fixture
def reach_sampling(monkeypatch):
    """Stop ``dpojax eval`` where it would sample, recording the rows it would sample; the model folders are
    taken as they are (no pipeline is read)."""
    reached = []

    class Reached(Exception):
        pass

    def record(caches, rows):
        reached.append(rows)
        raise Reached

    monkeypatch.setattr(run, "check_model_folder", Path)
    monkeypatch.setattr(run, "sample_missing", record)
    return Reached, reached


def test_cli_samples_the_prompts_of_a_tsv_or_a_prepared_split(tmp_path, prepared, reach_sampling):
    Reached, reached = reach_sampling
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text(PARTI, encoding="utf-8")
    (tmp_path / "model").mkdir()
    base = ["eval", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--seeds", "2"]
    with pytest.raises(Reached):
        main([*base, "--prompts", str(tsv)])
    assert [(r.index, r.prompt, r.seed) for r in reached[-1]] == [
        (i, p, s) for i, p in enumerate(PARTI_PROMPTS) for s in range(2)]
    root, report = prepared
    with pytest.raises(Reached):
        main([*base, "--prompts", str(root / "out"), "--split", "train"])
    train = first_seen(ex["caption"].decode() for ex in prepared_examples(report, "train"))
    assert [r.prompt for r in reached[-1][::2]] == train


def test_cli_bad_prompts_are_one_line_errors_with_code_2(tmp_path, prepared, capsys):
    root, _ = prepared
    (tmp_path / "bad.tsv").write_text("Text\tCategory\nbond\tAbstract\n", encoding="utf-8")
    (tmp_path / "ok.txt").write_text("a cat\n", encoding="utf-8")
    base = ["eval", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    cases = [(["--prompts", str(tmp_path / "bad.tsv")], "bad.tsv"),
             (["--prompts", str(root / "out"), "--split", "nope"], "no split 'nope'"),
             (["--prompts", str(tmp_path / "ok.txt"), "--split", "train"], "ok.txt")]
    for args, culprit in cases:
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dpojax eval: error:") and culprit in err, err
    assert not (tmp_path / "out").exists()
