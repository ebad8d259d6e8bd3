"""TFDS builder for Pick-a-Pic v2: local parquet shards (manual dir) -> winner-first pairs in array_record.

It also reads your own pairs: a JSONL file of ``{"caption", "winner", "loser"}`` rows naming image files
(relative to the file's folder, or absolute), built as one split of winner-first pairs.

Follows the official Diffusion-DPO data rules: a pair is put winner first (swapped when ``label_0 == 0``),
ties (``label_0 == 0.5``) are dropped unless asked for, and the optional Dreamlike filter keeps pairs whose
two generators both contain "dream". Images stay the original encoded bytes (so TensorFlow is never needed and
nothing is re-compressed); they are only decoded once here to skip broken ones. Every skipped row is counted
by reason; the counts are returned, printed, and saved in the dataset's ``metadata.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from PIL import Image

from dpojax.data.schema import DEFAULT_SPLITS, REQUIRED_COLUMNS, check_columns, split_files

# Skip reasons, in the order they are printed (cheap checks first, image decoding last). "missing_image" is a
# JSONL row naming an image file that cannot be read; it is checked first, before the file's bytes are needed.
SKIP_REASONS = ("bad_label", "tie", "not_dreamlike", "missing_caption", "missing_image", "corrupt_image")
JSONL_KEYS = ("caption", "winner", "loser")


@dataclasses.dataclass(eq=False)  # TFDS's BuilderConfig is a non-frozen dataclass
class PickapicConfig(tfds.core.BuilderConfig):
    drop_ties: bool = True
    dreamlike_only: bool = False


CONFIGS = (
    PickapicConfig(name="default", description="all generators, ties dropped (the paper's data)"),
    PickapicConfig(name="with_ties", drop_ties=False, description="all generators, ties kept with label 0.5"),
    PickapicConfig(name="dreamlike", dreamlike_only=True, description="both images from a Dreamlike model"),
    PickapicConfig(name="dreamlike_with_ties", drop_ties=False, dreamlike_only=True,
                   description="both images from a Dreamlike model, ties kept"),
)


def config_name(*, drop_ties: bool = True, dreamlike_only: bool = False) -> str:
    """The builder config that a (drop_ties, dreamlike_only) choice is stored under."""
    return next(c.name for c in CONFIGS if (c.drop_ties, c.dreamlike_only) == (drop_ties, dreamlike_only))


class PickapicV2(tfds.core.GeneratorBasedBuilder):
    """Registered with TFDS as ``pickapic_v2``; read it with ``tfds.data_source("pickapic_v2/<config>")``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Winner-first pairs with the original JPEG bytes."}
    BUILDER_CONFIGS = list(CONFIGS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the parquet shards of yuvalkirstain/pickapic_v2 (data/<split>-*.parquet) in the manual dir.")

    def __init__(self, *, splits: tuple[str, ...] = DEFAULT_SPLITS, jsonl: Path | None = None, **kwargs):
        self._splits = tuple(splits)
        self._jsonl = jsonl  # the source when it is a JSONL file of pairs (one split) rather than parquet shards
        self.counts: dict[str, collections.Counter] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        encoded = tfds.features.Tensor(shape=(), dtype=np.object_)  # raw JPEG bytes, decoded by the pipeline
        return tfds.core.DatasetInfo(
            builder=self,
            description="Pick-a-Pic v2 preference pairs, winner first (_w) and loser second (_l).",
            features=tfds.features.FeaturesDict({
                "caption": tfds.features.Text(),
                "jpg_w": encoded,
                "jpg_l": encoded,
                "label_w": tfds.features.Scalar(dtype=np.float64, doc="1.0, or 0.5 for a kept tie"),
                "model_w": tfds.features.Text(),
                "model_l": tfds.features.Text(),
                "image_uid_w": tfds.features.Text(),
                "image_uid_l": tfds.features.Text(),
            }),
            homepage="https://huggingface.co/datasets/yuvalkirstain/pickapic_v2",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, [self._jsonl] if self._jsonl else
                                               split_files(dl_manager.manual_dir, split))
                for split in self._splits}

    def _generate_examples(self, split: str, files: list[Path]) -> Iterator[tuple[str, dict]]:
        counts = self.counts.setdefault(split, collections.Counter())
        for path in files:
            for row_index, (example, reason) in enumerate(_file_examples(path, self.builder_config)):
                counts["rows"] += 1
                if reason is not None:
                    counts[reason] += 1
                    continue
                counts["kept"] += 1
                yield f"{path.name}:{row_index}", example
        self.info.metadata.setdefault("prepare_counts", {})[split] = dict(counts)
        if not counts["kept"]:
            raise ValueError(f"split '{split}' of {files[0].parent}: no pairs left after filtering "
                             f"({_format_counts(counts)})")


def _file_examples(path: Path, config: PickapicConfig) -> Iterator[tuple[dict | None, str | None]]:
    """(example, None) or (None, skip reason) for every row of a parquet shard or JSONL file."""
    if path.suffix != ".jsonl":
        yield from (_pair_example(row, config) for row in _read_rows(path))
        return
    for row in _jsonl_rows(path):
        yield (None, "missing_image") if row["jpg_0"] is None or row["jpg_1"] is None else _pair_example(row, config)


def _read_rows(path: Path) -> Iterator[dict]:
    """Rows of one shard with just the columns the builder needs, streamed in record batches."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=list(REQUIRED_COLUMNS)):
        yield from batch.to_pylist()


def _jsonl_records(path: Path) -> Iterator[dict]:
    """The rows of a JSONL pair file (blank lines ignored); a malformed row is a one-line error naming its line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: not a JSON object with keys " + ", ".join(JSONL_KEYS))
            for key in JSONL_KEYS:
                if key not in record:
                    raise ValueError(f"{path} line {number}: missing key '{key}'")
                if not isinstance(record[key], str) and not (key == "caption" and record[key] is None):
                    raise ValueError(f"{path} line {number}: '{key}' must be a string, got {record[key]!r}")
            yield record


def _jsonl_rows(path: Path) -> Iterator[dict]:
    """JSONL pairs as parquet-shaped rows, winner in slot 0; the bytes of an image that cannot be read are None."""
    for record in _jsonl_records(path):
        winner, loser = record["winner"], record["loser"]
        yield {"caption": record["caption"], "label_0": 1.0, "model_0": "", "model_1": "",
               "jpg_0": _read_bytes(path.parent / winner), "jpg_1": _read_bytes(path.parent / loser),
               "image_0_uid": winner, "image_1_uid": loser}


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()  # an absolute name in the JSONL replaces the folder it is joined to
    except OSError:
        return None


def _pair_example(row: dict, config: PickapicConfig) -> tuple[dict | None, str | None]:
    """The winner-first example for one parquet row, or the reason it is skipped."""
    label_0 = row["label_0"]
    if label_0 not in (0.0, 0.5, 1.0):
        return None, "bad_label"
    if label_0 == 0.5 and config.drop_ties:
        return None, "tie"
    if config.dreamlike_only and not all("dream" in (row[f"model_{i}"] or "") for i in (0, 1)):
        return None, "not_dreamlike"
    caption = (row["caption"] or "").strip()
    if not caption:
        return None, "missing_caption"
    if not (_decodes(row["jpg_0"]) and _decodes(row["jpg_1"])):
        return None, "corrupt_image"
    winner, loser = (1, 0) if label_0 == 0.0 else (0, 1)
    return {
        "caption": caption, "label_w": max(label_0, 1.0 - label_0),
        "jpg_w": row[f"jpg_{winner}"], "jpg_l": row[f"jpg_{loser}"],
        "model_w": row[f"model_{winner}"] or "", "model_l": row[f"model_{loser}"] or "",
        "image_uid_w": row[f"image_{winner}_uid"] or "", "image_uid_l": row[f"image_{loser}_uid"] or "",
    }, None


def _decodes(data: bytes | None) -> bool:
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode every coefficient but scale down, faster
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
    return True


def _format_counts(counts: collections.Counter) -> str:
    parts = [f"{counts['rows']} rows read", f"{counts['kept']} kept"]
    parts += [f"{counts[r]} {r.replace('_', ' ')}" for r in SKIP_REASONS if counts[r]]
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class PrepareReport:
    """Where the dataset went and, per split, how many rows were read, kept and skipped for each reason."""

    data_dir: Path
    dataset_name: str  # what `tfds.data_source` wants, e.g. "pickapic_v2/default"
    counts: dict[str, dict[str, int]]

    def summary(self) -> str:
        lines = [f"prepared {self.dataset_name} in {self.data_dir}"]
        lines += [f"  {split}: {_format_counts(collections.Counter(c))}" for split, c in self.counts.items()]
        return "\n".join(lines)


def prepare_pickapic(src: str | Path, out: str | Path, *, drop_ties: bool = True, dreamlike_only: bool = False,
                     splits: tuple[str, ...] | None = None) -> PrepareReport:
    """Build the array_record dataset under ``out`` from the parquet shards in ``src`` (or ``src/data``), or from
    ``src`` a JSONL file of pairs.

    ``splits`` defaults to ``DEFAULT_SPLITS`` for shards; a JSONL file is one split, ``train`` unless named.
    Fails early, before writing anything, on a split without shards, a shard that is not parquet, a shard
    missing a needed column, or a malformed JSONL row. An already prepared dataset in ``out`` is never
    overwritten.
    """
    src = Path(src)
    jsonl = src if src.suffix == ".jsonl" else None
    splits = tuple(splits) if splits is not None else ("train",) if jsonl else DEFAULT_SPLITS
    if not splits:
        raise ValueError("prepare_pickapic needs at least one split")
    if jsonl:
        if len(splits) != 1:
            raise ValueError(f"{src} is one split; name it with one --splits value, not {','.join(splits)}")
        for _ in _jsonl_records(jsonl):  # every row is checked before anything is written
            pass
    else:
        for split in splits:
            check_columns(split_files(src, split))
    config = config_name(drop_ties=drop_ties, dreamlike_only=dreamlike_only)
    builder = PickapicV2(data_dir=str(out), config=config, file_format="array_record", splits=splits, jsonl=jsonl)
    if (Path(builder.data_dir) / "dataset_info.json").exists():
        raise FileExistsError(f"{builder.data_dir} already holds a prepared dataset; remove it or use "
                              "another output folder")
    with tempfile.TemporaryDirectory() as downloads:
        builder.download_and_prepare(download_dir=downloads,
                                     download_config=tfds.download.DownloadConfig(
                                         manual_dir=str(src.parent if jsonl else src)))
    report = PrepareReport(Path(builder.data_dir), f"{builder.name}/{builder.builder_config.name}",
                           {split: dict(builder.counts[split]) for split in splits})
    print(report.summary())
    return report
