"""Human labels of a round: one JSON file per annotator in ``ROUND/labels/``, D3PO's format.

A file is a list over the round's prompts (in order) of k scores, higher = better (the page writes +1 good,
-1 bad, 0 unmarked), or ``null`` for a prompt this annotator has not labeled yet. D3PO's ``train.py``
truncates files of different lengths to the shortest; here a file that does not fit the round is an error,
because a silently shifted file would pair labels with the wrong images.

Every write replaces the whole file atomically (temp file, fsync, rename), so a killed process leaves the
previous or the new version, never a torn one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpojax.feedback.rounds import RoundInfo, round_info
from dpojax.weights.atomic import atomic_file

ANNOTATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
Entries = list[list[float] | None]


@dataclass(frozen=True)
class LabelSet:
    """scores (P, k) float32: mean over the annotators who labeled each prompt (0 where none did);
    labeled (P,) bool: at least one annotator labeled the prompt; annotators: file stems, sorted."""

    scores: np.ndarray
    labeled: np.ndarray
    annotators: list[str]


def check_annotator(name: str) -> str:
    if not isinstance(name, str) or not ANNOTATOR.fullmatch(name) or name.endswith(".json"):
        raise ValueError(f"annotator name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")
    return name


def label_path(info: RoundInfo, annotator: str) -> Path:
    return info.labels_dir / f"{check_annotator(annotator)}.json"


def annotator_files(info: RoundInfo) -> dict[str, Path]:
    """Every annotator's file (hidden files, such as unfinished temp files, are not annotators)."""
    if not info.labels_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(info.labels_dir.glob("*.json")) if not p.name.startswith(".")}


def read_annotator(info: RoundInfo, path: Path) -> Entries:
    """One annotator's entries, checked against the round's prompt and image counts."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"label file {path} is not valid JSON: {err}") from None
    num_prompts, k = len(info.prompts), info.images_per_prompt
    if not isinstance(entries, list) or len(entries) != num_prompts:
        got = f"{len(entries)} entries" if isinstance(entries, list) else f"a JSON {type(entries).__name__}"
        raise ValueError(f"label file {path} has {got}, the round has {num_prompts} prompts "
                         f"(expected a list of {num_prompts} lists of {k} scores, or null)")
    for i, entry in enumerate(entries):
        if entry is None:
            continue
        if not isinstance(entry, list) or len(entry) != k:
            got = f"{len(entry)} scores" if isinstance(entry, list) else repr(entry)
            raise ValueError(f"label file {path}: prompt {i} has {got}, the round has {k} images per prompt")
        if not all(_is_score(s) for s in entry):
            raise ValueError(f"label file {path}: prompt {i} holds a value that is not a finite number: {entry}")
    return entries


def _is_score(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_labels(round_dir: str | Path) -> LabelSet:
    """All annotators' labels of a round, averaged per prompt over those who labeled it."""
    info = round_info(round_dir)
    num_prompts, k = len(info.prompts), info.images_per_prompt
    total = np.zeros((num_prompts, k), np.float64)
    count = np.zeros(num_prompts, np.int64)
    files = annotator_files(info)
    for path in files.values():
        for i, entry in enumerate(read_annotator(info, path)):
            if entry is not None:
                total[i] += entry
                count[i] += 1
    scores = np.divide(total, np.maximum(count, 1)[:, None]).astype(np.float32)
    return LabelSet(scores, count > 0, list(files))


def load_entries(info: RoundInfo, annotator: str) -> Entries:
    """This annotator's entries so far (all null for a new annotator)."""
    path = label_path(info, annotator)
    return read_annotator(info, path) if path.exists() else [None] * len(info.prompts)


def write_entries(info: RoundInfo, annotator: str, entries: Entries) -> Path:
    """Replace the annotator's file with ``entries``, atomically and durably."""
    path = label_path(info, annotator)
    path.parent.mkdir(exist_ok=True)
    text = json.dumps(entries, separators=(",", ":")) + "\n"
    with atomic_file(path, durable=True) as f:
        f.write(text)
    return path
