"""The Pick-a-Pic v2 parquet schema and Hugging Face file layout, shared by synth and builder.

Column names and types follow the dataset card of ``yuvalkirstain/pickapic_v2`` so that the builder reads the
real shards and the synthetic ones through the same code.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PICKAPIC_SCHEMA = pa.schema([
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
    ("__index_level_0__", pa.int64()),
])

# What the builder reads; the other columns are provenance it does not need.
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "model_0", "model_1",
                    "image_0_uid", "image_1_uid")

DEFAULT_SPLITS = ("train", "validation", "validation_unique")  # what training and checkpoint selection use


def shard_name(split: str, index: int, count: int) -> str:
    """Hugging Face shard file name (the real shards add a hash suffix, which `split_files` accepts too)."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def shard_folder(src: str | Path) -> Path:
    """The folder holding the parquet shards: ``src/data`` (the Hub layout) or ``src`` itself."""
    src = Path(src)
    folder = src / "data" if (src / "data").is_dir() else src
    if not folder.is_dir():
        raise NotADirectoryError(f"Pick-a-Pic source folder {src} does not exist")
    return folder


def split_files(src: str | Path, split: str) -> list[Path]:
    """The parquet shards of one split, from ``src/data`` (the Hub layout) or from ``src`` itself."""
    folder = shard_folder(src)
    # "validation-*" never matches "validation_unique-*": the split name is followed by "-" exactly.
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        raise ValueError(f"no parquet shards for split '{split}' in {folder} (expected {split}-*.parquet)")
    return files


def check_columns(files: list[Path]) -> None:
    """A one-line error for a shard that is not parquet or lacks a column the builder reads."""
    for path in files:
        try:
            names = set(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise ValueError(f"{path}: not a readable parquet file ({err})") from err
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                             + ", ".join(f"'{c}'" for c in missing))
