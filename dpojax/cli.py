"""The ``dpojax`` command: argument parsing and dispatch only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys


def _init_tiny(args: argparse.Namespace) -> None:
    from dpojax.tiny import write_tiny_pipeline

    path = write_tiny_pipeline(args.path, arch=args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} pipeline to {path}")


def _sample(args: argparse.Namespace) -> None:
    from dpojax.pipeline import Pipeline, save_images

    pipe = Pipeline.from_pretrained(args.model_dir)
    images = pipe.sample(args.prompt, num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                         seed=args.seed, height=args.height, width=args.width)
    for path in save_images(images, args.out, prefix="sample"):
        print(path)


def _demo(args: argparse.Namespace) -> None:
    from dpojax.demo import run_demo

    run_demo(args.out, config_path=args.config, seed=args.seed, steps=args.steps)


def _plan(args: argparse.Namespace) -> int:
    from dpojax.plan import plan_from_command_line

    plan = plan_from_command_line(args.config, args.overrides, args.mesh, args.device_memory, args.arch_dir,
                                  args.platform)
    print(plan.report())
    return 0 if plan.fits else 1


def _config(args: argparse.Namespace) -> None:
    from dpojax.config import describe_keys, load_config

    if args.list:
        print(describe_keys(), end="")
        return
    if args.config is None:
        raise ValueError("give a CONFIG to resolve, or --list for every key")
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpojax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a tiny random pipeline folder in diffusers layout")
    p.add_argument("path")
    p.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_init_tiny)

    p = sub.add_parser("sample", help="generate PNGs from a diffusers pipeline folder with the JAX pipeline")
    p.add_argument("model_dir")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.set_defaults(run=_sample)

    p = sub.add_parser("demo", help="the tiny end-to-end demo on CPU, made entirely locally")
    p.add_argument("--out", default="demo")
    p.add_argument("--config", default="configs/tiny_sdxl_dpo.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps (default: the config's)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("config", help="print every config key with its default and meaning (--list), or a config "
                                      "file resolved with its overrides")
    p.add_argument("config", nargs="?", help="YAML file to validate and print resolved")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--list", action="store_true", help="every key, section by section, with default and meaning")
    p.set_defaults(run=_config)

    p = sub.add_parser("plan", help="compile a config's training step on fake CPU devices and report per-device "
                                    "memory and FLOPs (exit 1 when it does not fit)")
    p.add_argument("config", help="YAML file, e.g. configs/sdxl_dpo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.remat=none dpo.pairs_per_device=2")
    p.add_argument("--mesh", help="axis sizes, e.g. data=1,fsdp=8,tensor=1 (default: the config's mesh)")
    p.add_argument("--device-memory", type=float, default=16.0, help="GiB per device (default 16)")
    p.add_argument("--platform", choices=("gpu", "tpu"), default="gpu",
                   help="the accelerator whose program is planned: its attention kernel, its loops and "
                        "collectives, not the CPU-only paths (default gpu)")
    p.add_argument("--arch-dir", help="pipeline folder with the architecture configs (default: model.pretrained "
                                      "if it exists, else the one of model.arch shipped in dpojax/arch)")
    p.set_defaults(run=_plan)

    from dpojax.bench import register_cli as register_bench
    from dpojax.data.cli import register_cli as register_data
    from dpojax.evaluate.cli import register_cli as register_eval
    from dpojax.feedback.cli import register_cli as register_feedback
    from dpojax.train.cli import register_cli as register_train

    register_bench(sub)
    register_data(sub)
    register_eval(sub)
    register_feedback(sub)
    register_train(sub)
    return parser


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also come after the options
    (``dpojax plan CONFIG --mesh fsdp=8 model.remat=full``), which argparse alone rejects."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """The ``dpojax`` command; given ``argv`` (a call from Python), the process is left as it is."""
    if argv is None:
        from dpojax.host import prepare_process

        prepare_process()
    args = parse_command_line(argv)
    try:
        return args.run(args) or 0
    except (ValueError, ImportError, OSError, InterruptedError) as err:
        print(f"dpojax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
