"""The `dpojax data synth`, `prepare`, `relabel`, `generate` and `encode` commands; `register_cli` adds them."""

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

    splits = None if args.splits is None else tuple(s for s in args.splits.split(",") if s)
    prepare_pickapic(args.src, args.out, drop_ties=not args.keep_ties, dreamlike_only=args.dreamlike_only,
                     splits=splits)


def _scorer(args: argparse.Namespace):
    """``--scorer`` with its ``--scorer-option KEY=VALUE`` options."""
    from dpojax.scorers.registry import make_scorer, parse_options

    return make_scorer(args.scorer, **parse_options(args.scorer_option))


def cmd_relabel(args: argparse.Namespace) -> None:
    from dpojax.data.scored_pairs import relabel_pickapic

    relabel_pickapic(args.src, args.out, _scorer(args), batch_size=args.batch_size)


def cmd_generate(args: argparse.Namespace) -> None:
    from dpojax.data.scored_pairs import generate_pairs
    from dpojax.evaluate.images import Sampling
    from dpojax.evaluate.prompts import read_prompts

    prompts = read_prompts(args.prompts)
    sampling = Sampling(num_steps=args.num_steps, guidance=args.guidance, resolution=args.resolution,
                        batch_size=args.batch_size)
    generate_pairs(args.model, prompts, args.out, _scorer(args), images_per_prompt=args.images_per_prompt,
                   sampling=sampling, pairs=args.pairs, margin=args.margin, seed=args.seed, split=args.split)


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
    p.add_argument("src", help="folder with data/<split>-*.parquet (the Hub layout) or the shards themselves, or "
                               "a .jsonl file of {caption, winner, loser} rows (image paths)")
    p.add_argument("out", help="TFDS data_dir to write into")
    p.add_argument("--keep-ties", action="store_true", help="keep ties (label 0.5) instead of dropping them")
    p.add_argument("--dreamlike-only", action="store_true", help="only pairs whose models both say 'dream'")
    p.add_argument("--splits", help=f"comma-separated splits to build (default {','.join(DEFAULT_SPLITS)}; "
                                    f"a .jsonl file is one split, default train)")
    p.set_defaults(run=cmd_prepare)

    scorer_help = "a built-in scorer (brightness, aesthetic, pickscore, ...) or package.module:callable"
    option_help = "an option of the scorer, e.g. clip_model=/models/clip (repeat for several)"
    p = sub.add_parser("relabel", help="put every Pick-a-Pic pair winner-first by a scorer (AI feedback)")
    p.add_argument("src", help="folder with Pick-a-Pic-schema parquet shards (data/*.parquet or the shards)")
    p.add_argument("out", help="new folder: out/data/<same shard names> and out/relabel_report.json")
    p.add_argument("--scorer", required=True, help=scorer_help)
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    p.add_argument("--batch-size", type=int, default=16, help="pairs scored per call (default 16)")
    p.set_defaults(run=cmd_relabel)

    p = sub.add_parser("generate", help="sample k images per prompt, score them, write the best pairs as Pick-a-Pic")
    p.add_argument("model", help="diffusers pipeline folder to sample")
    p.add_argument("--prompts", required=True,
                   help="text file, one prompt per line, or any prompt set `dpojax eval --prompts` reads")
    p.add_argument("--images-per-prompt", type=int, default=4, help="k images per prompt (default 4)")
    p.add_argument("--scorer", required=True, help=scorer_help)
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    p.add_argument("--out", required=True, help="new folder: out/data/<split>-00000-of-00001.parquet and "
                                                "out/generate_report.json")
    p.add_argument("--pairs", choices=("best-worst", "all"), default="best-worst",
                   help="best against worst per prompt, or all C(k,2) pairs (default best-worst)")
    p.add_argument("--margin", type=float, default=0.0, help="keep pairs whose scores differ by more (default 0)")
    p.add_argument("--split", default="train", help="split name of the written shard (default train)")
    p.add_argument("--num-steps", type=int, default=30, help="DDIM steps, eta 0 (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--resolution", type=int, help="square image size in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i uses seed SEED + i*k + j (default 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per sampling call, rounded down to whole prompts (default 8)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("encode", help="cache VAE latent distributions and text embeddings for training")
    p.add_argument("config", help="the training config: model.*, data.* and mesh.* say what to encode and how")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", required=True, help="new cache folder; train with data.cache_dir=<it>")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype of the cached arrays")
    p.set_defaults(run=cmd_encode)
