"""The `dpojax data synth`, `data prepare` and `data encode` commands; `register_cli` adds them."""

from __future__ import annotations

import argparse

from dpojax.data.schema import DEFAULT_SPLITS


def cmd_synth(args: argparse.Namespace) -> None:
    from dpojax.data.synth import write_synthetic_pickapic

    report = write_synthetic_pickapic(
        args.out, args.rows, seed=args.seed, image_size=args.image_size, shards=args.shards,
        tie_fraction=args.tie_fraction, corrupt_images=args.corrupt_images,
        missing_captions=args.missing_captions)
    for split, rows in report.rows.items():
        print(f"{split}: {rows} rows ({report.ties[split]} ties)")
    print(f"wrote {len(report.files)} parquet shards to {args.out}/data (preferred image = the brighter one)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from dpojax.data.pickapic import prepare_pickapic

    splits = tuple(s for s in args.splits.split(",") if s)
    prepare_pickapic(args.src, args.out, drop_ties=not args.keep_ties, dreamlike_only=args.dreamlike_only,
                     splits=splits)


def cmd_encode(args: argparse.Namespace) -> None:
    from dpojax.config import load_config
    from dpojax.data.cache import encode_cache

    encode_cache(load_config(args.config, args.overrides), args.out, store_dtype=args.dtype)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the ``dpojax`` parser; each leaf sets ``run``."""
    data = subparsers.add_parser("data", help="Pick-a-Pic data: synthetic shards and the TFDS build")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="write synthetic Pick-a-Pic v2 parquet shards (brighter image wins)")
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=64, help="train rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="shorter image side in pixels")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--tie-fraction", type=float, default=0.1)
    p.add_argument("--corrupt-images", type=int, default=0, help="train rows with a truncated JPEG")
    p.add_argument("--missing-captions", type=int, default=0, help="train rows with no caption")
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("prepare", help="build TFDS array_record pairs from local Pick-a-Pic v2 parquet")
    p.add_argument("src", help="folder with data/<split>-*.parquet (the Hub layout) or the shards themselves")
    p.add_argument("out", help="TFDS data_dir to write into")
    p.add_argument("--keep-ties", action="store_true", help="keep ties (label 0.5) instead of dropping them")
    p.add_argument("--dreamlike-only", action="store_true", help="only pairs whose models both say 'dream'")
    p.add_argument("--splits", default=",".join(DEFAULT_SPLITS), help="comma-separated splits to build")
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("encode", help="cache VAE latent distributions and text embeddings for training")
    p.add_argument("config", help="the training config: model.*, data.* and mesh.* say what to encode and how")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", required=True, help="new cache folder; train with data.cache_dir=<it>")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype of the cached arrays")
    p.set_defaults(run=cmd_encode)
