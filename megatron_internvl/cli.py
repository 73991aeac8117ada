"""`megatron-internvl` command line: train, convert, plan, inspect-data, filter-data, filter-apply."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from megatron_internvl.config import ConfigError, load_config

    try:
        # World size is checked again once the processes exist; here the recipe itself.
        config = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"megatron-internvl train: config error: {exc}", file=sys.stderr)
        return 2
    from megatron_internvl.training.main import main as train_main

    return train_main([args.recipe] + list(args.overrides))


def _plan(args) -> int:
    """Print the resolved config and the derived layout, without launching anything."""
    import yaml

    from megatron_internvl.config import ConfigError, load_config
    from megatron_internvl.config.loader import config_to_dict

    try:
        config = load_config(args.recipe, args.overrides, world_size=args.world_size)
    except ConfigError as exc:
        print(f"megatron-internvl plan: config error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    if args.world_size:
        p = config.parallel
        dp = p.data_parallel(args.world_size)
        steps = config.training.global_batch_size // (config.training.micro_batch_size * dp)
        print(f"# layout: TP={p.tensor_parallel} PP={p.pipeline_parallel} CP={p.context_parallel} "
              f"DP={dp}; {steps} micro-batches per rank per step")
    return 0


def _slurm(rest) -> int:
    from megatron_internvl.launch.slurm import main as slurm_main

    return slurm_main(rest)


def _convert(rest) -> int:
    from megatron_internvl.convert.cli import main as convert_main

    return convert_main(rest) or 0


def _inspect_data(rest) -> int:
    import runpy
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "inspect_data.py"
    sys.argv = [str(tool)] + list(rest)
    runpy.run_path(str(tool), run_name="__main__")
    return 0


def _filter_data(rest) -> int:
    from megatron_internvl.data.quality.cli import filter_main

    return filter_main(rest)


def _filter_apply(rest) -> int:
    from megatron_internvl.data.quality.cli import apply_main

    return apply_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-internvl",
        description="Train InternVL-family vision-language models on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train from a YAML recipe (launch with torchrun or srun for several processes)",
        description="Train from a YAML recipe. Any field can be overridden as section.key=value, "
        "e.g. training.train_steps=50 parallel.tensor_parallel=2. Launch several processes with "
        "`torchrun --nproc-per-node N -m megatron_internvl.train RECIPE` or srun. Exit code 42: stopped by SIGTERM/SIGUSR1 or training.time_limit_minutes after saving a checkpoint (requeue me).",
    )
    train.add_argument("recipe", help="YAML recipe (may extend others with `defaults:`)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.set_defaults(func=_train)

    plan = sub.add_parser("plan", help="validate a recipe and print the resolved config and layout")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--world-size", type=int, default=None, help="check the layout for N processes")
    plan.set_defaults(func=_plan)

    sub.add_parser("slurm", help="render (--dry-run) or submit (--submit) the sbatch script for a recipe "
                   "(see `slurm --help`)", add_help=False)
    sub.add_parser("convert", help="Hugging Face <-> Megatron checkpoints (see `convert --help`)",
                   add_help=False)
    sub.add_parser("inspect-data", help="statistics of a data mixture (see `inspect-data --help`)",
                   add_help=False)
    sub.add_parser("filter-data", help="flag anomalous samples of a mixture for review (see `filter-data --help`)",
                   add_help=False)
    sub.add_parser("filter-apply", help="apply a reviewed filter-data run, write a new meta JSON",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers get the rest of the line untouched.
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    if argv and argv[0] == "slurm":
        return _slurm(argv[1:])
    if argv and argv[0] == "inspect-data":
        return _inspect_data(argv[1:])
    if argv and argv[0] == "filter-data":
        return _filter_data(argv[1:])
    if argv and argv[0] == "filter-apply":
        return _filter_apply(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
