"""``dpojax eval MODEL [--against REF] --prompts PATH [--split NAME] --out DIR``; ``register_cli`` adds it (the
heavy imports wait until the command runs)."""

from __future__ import annotations

import argparse


def cmd_eval(args: argparse.Namespace) -> int:
    from dpojax.evaluate.images import Sampling
    from dpojax.evaluate.prompts import read_prompts
    from dpojax.evaluate.run import evaluate
    from dpojax.scorers.registry import check_options_taken, parse_options, split_specs

    scorer_specs, options = split_specs(args.scorers), parse_options(args.scorer_option)
    check_options_taken(scorer_specs, options)
    sampling = Sampling(num_steps=args.num_steps, guidance=args.guidance, resolution=args.resolution,
                        batch_size=args.batch_size)
    prompts = read_prompts(args.prompts, args.split)
    evaluate(args.model, args.against, prompts, scorer_specs, args.out, seeds=args.seeds, sampling=sampling,
             scorer_options=options)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the ``dpojax`` parser."""
    p = subparsers.add_parser("eval", help="score a model's images (and its win rate over a reference) with 95%% "
                                           "intervals; images cached, report.html")
    p.add_argument("model", help="diffusers pipeline folder, e.g. a training run's final/")
    p.add_argument("--against", help="reference pipeline folder: same prompts, seeds and sampler")
    p.add_argument("--prompts", required=True,
                   help="a text file (one prompt per line), PartiPrompts.tsv (its Prompt column), an HPSv2 "
                        "benchmark .json (a list of prompts) or a folder of them (all, in file name order), or "
                        "a `dpojax data prepare` folder (the unique captions of --split)")
    p.add_argument("--split", help="split of the prepared dataset that --prompts names (default validation_unique)")
    p.add_argument("--scorers", default="brightness",
                   help="comma-separated scorer names or package.module:callable paths, each scored separately")
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a model file of a scorer, e.g. pickscore_model=DIR, pickscore_processor=DIR, clip_model=DIR, "
                        "clip_processor=DIR, head=FILE (aesthetic); repeatable")
    p.add_argument("--out", required=True, help="output folder (its image cache makes reruns resume)")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt, seeds 0..N-1 (default 1)")
    p.add_argument("--num-steps", type=int, default=30, help="DDIM steps, eta 0 (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--resolution", type=int, help="square image size in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling call (default 8)")
    p.set_defaults(run=cmd_eval)
