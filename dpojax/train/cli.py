"""``dpojax train CONFIG [key=value ...]`` and ``dpojax export CHECKPOINT OUT``; ``register_cli`` adds them."""

from __future__ import annotations

import argparse
import signal


def cmd_train(args: argparse.Namespace) -> int:
    from dpojax.config import load_config
    from dpojax.train.dpo import train

    result = train(load_config(args.config, args.overrides))
    if result.interrupted_by is not None:
        return 128 + signal.Signals[result.interrupted_by].value  # preempted: let the launcher restart it
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dpojax.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, kind=args.kind, base=args.base)
    print(f"exported {args.kind} to {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``export`` to the ``dpojax`` parser; each sets ``run`` (returning an exit code)."""
    p = subparsers.add_parser("train", help="Diffusion-DPO / SFT training from a YAML config (resumes itself)")
    p.add_argument("config", help="YAML file, e.g. configs/tiny_sdxl_dpo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-5 train.steps=100")
    p.set_defaults(run=cmd_train)

    p = subparsers.add_parser("export", help="write a checkpoint's UNet as a diffusers folder")
    p.add_argument("checkpoint", help="run folder (latest checkpoint), its checkpoints/ or checkpoints/<step>")
    p.add_argument("out")
    p.add_argument("--kind", choices=("pipeline", "unet"), default="pipeline",
                   help="pipeline: the base pipeline with the UNet replaced; unet: the UNet folder alone")
    p.add_argument("--base", help="base pipeline folder (default: the run's model.pretrained)")
    p.set_defaults(run=cmd_export)

