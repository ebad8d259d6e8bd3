"""``dpojax train CONFIG [key=value ...]`` (Diffusion-DPO, or D3PO online when the config's ``objective`` is
d3po), ``dpojax d3po sample|train`` (human-feedback rounds) and ``dpojax export CHECKPOINT OUT``;
``register_cli`` adds them."""

from __future__ import annotations

import argparse
import signal

from dpojax import distributed


def cmd_train(args: argparse.Namespace) -> int:
    from dpojax.config import load_config
    from dpojax.train.harness import objective_module

    config = load_config(args.config, args.overrides)  # a bad config fails before any process waits on it
    distributed.initialize(args)
    return exit_code(objective_module(config).train(config))


def exit_code(result) -> int:
    if result.interrupted_by is not None:
        return 128 + signal.Signals[result.interrupted_by].value  # preempted: let the launcher restart it
    return 0


def cmd_d3po_sample(args: argparse.Namespace) -> int:
    from dpojax.config import load_config
    from dpojax.train.d3po import sample_round

    sample_round(load_config(args.config, args.overrides), args.out)
    return 0


def cmd_d3po_train(args: argparse.Namespace) -> int:
    from dpojax.train.d3po import train_round

    distributed.initialize(args)
    return exit_code(train_round(args.round, args.overrides))


def cmd_export(args: argparse.Namespace) -> int:
    from dpojax.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, kind=args.kind, base=args.base, which=args.step)
    print(f"exported {args.kind} to {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``d3po`` and ``export`` to the ``dpojax`` parser; each sets ``run`` (returning an exit code)."""
    p = subparsers.add_parser("train", help="Diffusion-DPO / SFT or online D3PO training from a YAML config "
                                            "(resumes itself)")
    p.add_argument("config", help="YAML file, e.g. configs/tiny_sdxl_dpo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-5 dpo.steps=100")
    distributed.add_arguments(p)
    p.set_defaults(run=cmd_train)

    d3po = subparsers.add_parser("d3po", help="D3PO human-feedback rounds: sample a round, train on its labels")
    rounds = d3po.add_subparsers(dest="d3po_command", required=True)
    p = rounds.add_parser("sample", help="sample images and trajectories of model.pretrained into a new round")
    p.add_argument("config", help="a D3PO YAML file, e.g. configs/tiny_d3po_brightness.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.pretrained=ROUND1/train/final")
    p.add_argument("--out", required=True, help="the new round folder (must not exist)")
    p.set_defaults(run=cmd_d3po_sample)
    p = rounds.add_parser("train", help="train on a labeled round; exports ROUND/train/final")
    p.add_argument("round", help="a round folder written by `dpojax d3po sample`, with labels/*.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. d3po.num_epochs=10")
    distributed.add_arguments(p)
    p.set_defaults(run=cmd_d3po_train)

    p = subparsers.add_parser("export", help="write a checkpoint's UNet as a diffusers folder")
    p.add_argument("checkpoint", help="run folder (latest checkpoint), its checkpoints/ or checkpoints/<step>")
    p.add_argument("out")
    p.add_argument("--kind", choices=("pipeline", "unet", "lora"), default="pipeline",
                   help="pipeline: the base pipeline with the UNet replaced; unet: the UNet folder alone (a LoRA "
                        "run's adapters merged in, for both); lora: a LoRA run's adapters as "
                        "pytorch_lora_weights.safetensors for diffusers' load_lora_weights")
    p.add_argument("--base", help="base pipeline folder (default: the run's model.pretrained)")
    p.add_argument("--step", default="latest", help="of a run folder: latest (default), best (the best median "
                                                    "score of train.eval_every), or a step number")
    p.set_defaults(run=cmd_export)

