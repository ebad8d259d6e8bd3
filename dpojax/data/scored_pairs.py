"""Preference pairs from AI feedback, decided by a scorer (``dpojax.scorers``): ``dpojax data relabel`` and
``dpojax data generate``. (People's preferences, the labeled D3PO rounds, are ``dpojax.feedback``.)

- ``relabel_pickapic``: Pick-a-Pic-schema shards in, the same shards out with each pair put winner-first by a
  scorer (the Diffusion-DPO paper's ``--choice_model``); pairs the scorer cannot separate are dropped.
- ``generate_pairs``: k samples per prompt from a pipeline folder, scored, written as Pick-a-Pic-schema pairs
  (best against worst, or every pair whose scores differ by more than a margin).

Both write OUT in one atomic step, with a JSON report of their counts, and ``dpojax data prepare OUT`` reads it.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import io
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from dpojax.data.schema import PICKAPIC_SCHEMA, check_columns, shard_folder, shard_name
from dpojax.data.transforms import decode_rgb
from dpojax.evaluate.images import Row, Sampling, sample_rows
from dpojax.evaluate.run import check_model_folder
from dpojax.pipeline import Pipeline
from dpojax.scorers.base import Scorer, score_per_image
from dpojax.weights.atomic import atomic_folder

# read = kept + ties_dropped + unreadable; kept = agreeing + flipped + original_ties (pairs whose original label
# was a tie, or any value but 0 and 1, now decided by the scorer).
RELABEL_COUNTS = ("read", "kept", "agreeing", "flipped", "original_ties", "ties_dropped", "unreadable")
# The columns that describe one image of the pair; a swap exchanges each _0 column with its _1 twin.
PAIRED_COLUMNS = (("jpg_0", "jpg_1"), ("image_0_uid", "image_1_uid"), ("image_0_url", "image_1_url"),
                  ("model_0", "model_1"), ("label_0", "label_1"))
PAIR_MODES = ("best-worst", "all")


def _new_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another output folder")
    return out


def _scores(scorer: Scorer, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
    """One score per image. A scorer takes one (N, H, W, 3) array, so images are grouped by shape (real
    Pick-a-Pic images come in a few sizes) rather than resized, which could change what the scorer sees."""
    scores = np.empty(len(images), np.float32)
    by_shape = collections.defaultdict(list)
    for i, image in enumerate(images):
        by_shape[image.shape].append(i)
    for index in by_shape.values():
        scores[index] = score_per_image(scorer, np.stack([images[i] for i in index]), [prompts[i] for i in index])
    return scores


def _decode(data: bytes | None) -> np.ndarray | None:
    if not data:
        return None
    try:
        return np.asarray(decode_rgb(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


@dataclasses.dataclass(frozen=True)
class RelabelReport:
    """Where the relabeled shards went and how many pairs fell in each bucket of ``RELABEL_COUNTS``."""

    out: Path
    counts: dict[str, int]

    @property
    def agreement(self) -> float | None:
        """The fraction of originally decided pairs on which the scorer picks the original winner."""
        decided = self.counts["agreeing"] + self.counts["flipped"]
        return self.counts["agreeing"] / decided if decided else None

    def summary(self) -> str:
        c = self.counts
        agreement = "n/a" if self.agreement is None else f"{self.agreement:.1%}"
        return (f"relabeled {c['read']} pairs into {self.out}: {c['kept']} kept ({c['agreeing']} agreeing with the "
                f"original label, {c['flipped']} flipped, {c['original_ties']} original ties decided), "
                f"{c['ties_dropped']} ties dropped, {c['unreadable']} with an unreadable image skipped; "
                f"agreement {agreement}")


def relabel_pickapic(src: str | Path, out: str | Path, scorer: Scorer, *, batch_size: int = 16) -> RelabelReport:
    """Rewrite every parquet shard of ``src`` (or ``src/data``) into ``out/data`` with the same name and schema,
    each pair winner-first by ``scorer`` (label_0 = 1, label_1 = 0) and scored ``batch_size`` pairs at a time;
    ``out/relabel_report.json`` holds the counts. A failure leaves no ``out``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    folder = shard_folder(src)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ValueError(f"no parquet shards in {folder}")
    check_columns(files)
    out = _new_folder(out)
    counts = collections.Counter(dict.fromkeys(RELABEL_COUNTS, 0))
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        for path in tqdm(files, desc="relabeling", unit="shard", file=sys.stderr):
            source = pq.ParquetFile(path)
            with pq.ParquetWriter(tmp / "data" / path.name, source.schema_arrow) as writer:
                for batch in source.iter_batches(batch_size=batch_size):
                    rows = _relabel_rows(batch.to_pylist(), scorer, counts)
                    writer.write_table(pa.Table.from_pylist(rows, schema=source.schema_arrow))
        report = RelabelReport(out, dict(counts))
        (tmp / "relabel_report.json").write_text(json.dumps(
            {"source": str(src), "scorer": scorer.name, "counts": report.counts, "agreement": report.agreement},
            indent=1))
    print(report.summary())
    return report


def _relabel_rows(rows: list[dict], scorer: Scorer, counts: collections.Counter) -> list[dict]:
    """The rows the scorer separates, winner first; ``counts`` gets every row's bucket."""
    counts["read"] += len(rows)
    readable, images = [], []
    for row in rows:
        pair = [_decode(row["jpg_0"]), _decode(row["jpg_1"])]
        if pair[0] is None or pair[1] is None:
            counts["unreadable"] += 1
            continue
        readable.append(row)
        images += pair
    prompts = [row["caption"] or "" for row in readable for _ in range(2)]
    scores = _scores(scorer, images, prompts).reshape(-1, 2)
    kept = []
    for row, (score_0, score_1) in zip(readable, scores, strict=True):
        if score_0 == score_1:
            counts["ties_dropped"] += 1
            continue
        winner = 0 if score_0 > score_1 else 1
        if row["label_0"] in (0.0, 1.0):
            counts["agreeing" if row["label_0"] == 1.0 - winner else "flipped"] += 1
        else:
            counts["original_ties"] += 1
        kept.append(_winner_first(row, winner))
    counts["kept"] += len(kept)
    return kept


def _winner_first(row: dict, winner: int) -> dict:
    """A copy of ``row`` with image ``winner``'s columns in slot 0, labelled as the preferred one."""
    row = dict(row)
    if winner == 1:
        for first, second in PAIRED_COLUMNS:
            if first in row:
                row[first], row[second] = row[second], row[first]
    row.update(label_0=1.0, label_1=0.0)
    if "best_image_uid" in row:
        row["best_image_uid"] = row["image_0_uid"]
    return row


def select_pairs(scores: np.ndarray, mode: str, margin: float) -> list[tuple[int, int]]:
    """(winner, loser) indices among one prompt's image scores: best against worst, or all C(k, 2) pairs; only
    pairs whose scores differ by more than ``margin`` are kept (so equal scores never make a pair)."""
    if mode == "best-worst":
        candidates = [(int(np.argmax(scores)), int(np.argmin(scores)))]
    else:
        candidates = [(i, j) if scores[i] >= scores[j] else (j, i)
                      for i, j in itertools.combinations(range(len(scores)), 2)]
    return [(w, lo) for w, lo in candidates if scores[w] - scores[lo] > margin]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_pairs(model: str | Path, prompts: list[str], out: str | Path, scorer: Scorer, *, images_per_prompt: int,
                   sampling: Sampling, pairs: str = "best-worst", margin: float = 0.0, seed: int = 0,
                   split: str = "train") -> dict:
    """Sample ``images_per_prompt`` images per prompt, score them, and write the chosen pairs winner-first as one
    Pick-a-Pic-schema shard ``out/data/<split>-00000-of-00001.parquet``, with ``out/generate_report.json``.

    Image j of prompt i uses seed ``seed + i * k + j`` (the image ``dpojax sample --seed`` makes). Images are
    stored as PNG, so the stored pixels are exactly the scored ones. Returns the report; a failure leaves no ``out``.
    """
    k = images_per_prompt
    if k < 2:
        raise ValueError(f"--images-per-prompt must be at least 2 to make a pair, got {k}")
    if pairs not in PAIR_MODES:
        raise ValueError(f"--pairs must be one of {', '.join(PAIR_MODES)}, got {pairs!r}")
    if margin < 0:
        raise ValueError(f"--margin must be at least 0, got {margin}")
    folder = check_model_folder(model)
    out = _new_folder(out)
    # Whole prompts per sampling call, so each prompt's k images are scored and paired together.
    prompts_per_call = max(1, sampling.batch_size // k)
    sampling = dataclasses.replace(sampling, batch_size=prompts_per_call * k)
    pipe = Pipeline.from_pretrained(folder)
    per_prompt, written = [], 0
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        # Pairs are written as each call finishes, so only one call's images are held in memory.
        with pq.ParquetWriter(tmp / "data" / shard_name(split, 0, 1), PICKAPIC_SCHEMA) as writer:
            for start in tqdm(range(0, len(prompts), prompts_per_call), desc="sampling", unit="call",
                              file=sys.stderr):
                rows = [Row(i, prompts[i], seed + i * k + j)
                        for i in range(start, min(start + prompts_per_call, len(prompts))) for j in range(k)]
                images = sample_rows(pipe, rows, sampling)
                scores = score_per_image(scorer, images, [row.prompt for row in rows])
                records = []
                for first in range(0, len(rows), k):
                    group, chosen = rows[first:first + k], select_pairs(scores[first:first + k], pairs, margin)
                    per_prompt.append({"prompt": group[0].prompt, "seeds": [r.seed for r in group],
                                       "scores": scores[first:first + k].tolist(), "pairs": chosen})
                    records += [_pair_record(group[w], group[lo], images[first + w], images[first + lo],
                                             str(folder), len(chosen), written + len(records) + n)
                                for n, (w, lo) in enumerate(chosen)]
                writer.write_table(pa.Table.from_pylist(records, schema=PICKAPIC_SCHEMA))
                written += len(records)
        if not written:
            raise ValueError(f"no pair of images scored more than --margin {margin} apart; nothing to write")
        report = {"model": str(folder), "scorer": scorer.name, "images_per_prompt": k, "pairs": pairs,
                  "margin": margin, "sampling": dataclasses.asdict(sampling), "seed": seed, "split": split,
                  "counts": {"prompts": len(prompts), "images": len(prompts) * k, "pairs": written,
                             "prompts_without_pair": sum(not p["pairs"] for p in per_prompt)},
                  "per_prompt": per_prompt}
        (tmp / "generate_report.json").write_text(json.dumps(report, indent=1))
    counts = report["counts"]
    print(f"wrote {counts['pairs']} pairs from {counts['images']} images of {counts['prompts']} prompts to {out}/data "
          f"({counts['prompts_without_pair']} prompts without a pair)")
    return report


def _pair_record(winner: Row, loser: Row, winner_image: np.ndarray, loser_image: np.ndarray, model: str,
                 pairs_of_prompt: int, index: int) -> dict:
    """One Pick-a-Pic row, winner in slot 0; an image's uid is ``<prompt index>_<seed>``."""
    return {"are_different": True, "best_image_uid": winner.name, "caption": winner.prompt,
            "created_at": datetime.datetime.now(), "has_label": True,
            "image_0_uid": winner.name, "image_0_url": None, "image_1_uid": loser.name, "image_1_url": None,
            "jpg_0": _png(winner_image), "jpg_1": _png(loser_image), "label_0": 1.0, "label_1": 0.0,
            "model_0": model, "model_1": model, "ranking_id": index, "user_id": None,
            "num_example_per_prompt": pairs_of_prompt, "__index_level_0__": index}
