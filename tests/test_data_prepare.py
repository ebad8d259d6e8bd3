"""Synthetic Pick-a-Pic shards and the TFDS builder: schema, winner-first swap, filters, skips and errors.

The truth is read straight from the parquet files with pyarrow and PIL, independently of the builder.
"""

import argparse

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import decode_image, preference_score, prepared_examples, shard_rows

from dpojax.data.cli import register_cli
from dpojax.data.pickapic import prepare_pickapic
from dpojax.data.schema import PICKAPIC_SCHEMA, split_files
from dpojax.data.synth import write_synthetic_pickapic

ROWS, TIES, CORRUPT, MISSING = 40, 4, 2, 2


def _clean_decodes(data) -> bool:
    try:
        decode_image(data)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    out = tmp_path_factory.mktemp("pickapic_src")
    report = write_synthetic_pickapic(out, ROWS, seed=0, tie_fraction=TIES / ROWS, corrupt_images=CORRUPT,
                                      missing_captions=MISSING)
    assert report.ties["train"] == TIES
    return out


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory):
    return prepare_pickapic(src, tmp_path_factory.mktemp("tfds"))


def test_synthetic_shards_follow_the_schema_and_the_brightness_rule(src):
    files = split_files(src, "train")
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert {s: len(split_files(src, s)) for s in ("validation", "validation_unique")} == {
        "validation": 1, "validation_unique": 1}
    assert pq.read_schema(files[0]).names == PICKAPIC_SCHEMA.names
    rows = shard_rows(src)
    labels = np.array([r["label_0"] for r in rows])
    assert len(rows) == ROWS and set(labels) == {0.0, 0.5, 1.0} and np.sum(labels == 0.5) == TIES
    np.testing.assert_array_equal([r["label_1"] for r in rows], 1.0 - labels)
    assert any("dream" in r["model_0"] and "dream" in r["model_1"] for r in rows)
    clean = [r for r in rows
             if r["label_0"] != 0.5 and _clean_decodes(r["jpg_0"]) and _clean_decodes(r["jpg_1"])]
    assert len(clean) == ROWS - TIES - CORRUPT
    for r in clean:
        s0, s1 = preference_score(decode_image(r["jpg_0"])), preference_score(decode_image(r["jpg_1"]))
        assert (s0 > s1 + 0.15) if r["label_0"] == 1.0 else (s1 > s0 + 0.15)


def test_prepare_puts_the_winner_first_and_counts_every_skip(src, prepared):
    assert prepared.counts["train"] == {"rows": ROWS, "kept": ROWS - TIES - CORRUPT - MISSING, "tie": TIES,
                                        "corrupt_image": CORRUPT, "missing_caption": MISSING}
    assert prepared.counts["validation"]["rows"] == prepared.counts["validation"]["kept"] + \
        prepared.counts["validation"].get("tie", 0)
    by_uid = {r[f"image_{i}_uid"]: (r, i) for r in shard_rows(src) for i in (0, 1)}
    examples = prepared_examples(prepared)
    assert len(examples) == prepared.counts["train"]["kept"]
    swapped = 0
    for ex in examples:
        row, side = by_uid[ex["image_uid_w"].decode()]
        assert row[f"label_{side}"] == 1.0 and ex["label_w"] == 1.0
        assert ex["jpg_w"] == row[f"jpg_{side}"] and ex["jpg_l"] == row[f"jpg_{1 - side}"]  # original bytes
        assert ex["caption"].decode() == row["caption"]
        assert preference_score(decode_image(ex["jpg_w"])) > preference_score(decode_image(ex["jpg_l"]))
        swapped += side == 1
    assert 0 < swapped < len(examples)


def test_keep_ties_stores_them_with_label_one_half(src, tmp_path):
    report = prepare_pickapic(src, tmp_path, drop_ties=False, splits=("train",))
    assert report.dataset_name == "pickapic_v2/with_ties"
    labels = [ex["label_w"] for ex in prepared_examples(report)]
    assert len(labels) == ROWS - CORRUPT - MISSING and labels.count(0.5) == TIES
    assert "tie" not in report.counts["train"]


def test_dreamlike_only_keeps_pairs_where_both_models_are_dreamlike(src, tmp_path):
    report = prepare_pickapic(src, tmp_path, dreamlike_only=True, splits=("train",))
    examples = prepared_examples(report)
    assert examples and all(b"dream" in ex["model_w"] and b"dream" in ex["model_l"] for ex in examples)
    expected = sum(1 for r in shard_rows(src) if r["label_0"] != 0.5 and "dream" in r["model_0"]
                   and "dream" in r["model_1"] and (r["caption"] or "").strip()
                   and _clean_decodes(r["jpg_0"]) and _clean_decodes(r["jpg_1"]))
    assert len(examples) == expected
    assert report.counts["train"]["not_dreamlike"] > 0


def test_a_missing_column_is_a_one_line_error_naming_it_and_the_file(src, tmp_path):
    bad = tmp_path / "src" / "data"
    bad.mkdir(parents=True)
    shard = bad / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(split_files(src, "train")[0]).drop_columns(["jpg_1"]), shard)
    with pytest.raises(ValueError, match=r"missing column 'jpg_1'") as err:
        prepare_pickapic(tmp_path / "src", tmp_path / "out", splits=("train",))
    assert str(shard) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_all_ties_or_no_rows_are_clear_errors(tmp_path):
    write_synthetic_pickapic(tmp_path / "ties", 6, seed=1, tie_fraction=1.0)
    with pytest.raises(ValueError, match=r"split 'train'.*no pairs left.*6 tie"):
        prepare_pickapic(tmp_path / "ties", tmp_path / "out", splits=("train",))
    assert not list((tmp_path / "out").rglob("dataset_info.json"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no parquet shards for split 'train'"):
        prepare_pickapic(tmp_path / "empty", tmp_path / "out2", splits=("train",))

    empty_shard = tmp_path / "zero" / "train-00000-of-00001.parquet"
    empty_shard.parent.mkdir()
    pq.write_table(PICKAPIC_SCHEMA.empty_table(), empty_shard)
    with pytest.raises(ValueError, match=r"no pairs left after filtering \(0 rows read, 0 kept\)"):
        prepare_pickapic(tmp_path / "zero", tmp_path / "out3", splits=("train",))


def test_a_prepared_dataset_is_never_overwritten(src, prepared):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in prepared.data_dir.iterdir())
    with pytest.raises(FileExistsError, match="already holds a prepared dataset"):
        prepare_pickapic(src, prepared.data_dir.parents[2])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in prepared.data_dir.iterdir()) == before


def test_cli_synth_then_prepare(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="dpojax")
    register_cli(parser.add_subparsers(dest="command", required=True))
    for argv in (["data", "synth", str(tmp_path / "src"), "--rows", "8", "--tie-fraction", "0.25"],
                 ["data", "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--splits", "train"]):
        args = parser.parse_args(argv)
        args.run(args)
    out = capsys.readouterr().out
    assert "train: 8 rows (2 ties)" in out
    assert "train: 8 rows read, 6 kept, 2 tie" in out
