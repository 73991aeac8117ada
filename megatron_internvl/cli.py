"""`megatron-internvl` command line: train, convert, plan, inspect-data, index-data, filter-data,
filter-apply, verify-checkpoint."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from megatron_internvl.config import ConfigError, load_config

    try:
        # World size is checked again once the processes exist; here the recipe itself.
        load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"megatron-internvl train: config error: {exc}", file=sys.stderr)
        return 2
    from megatron_internvl.training.main import main as train_main

    return train_main([args.recipe] + list(args.overrides))


def _plan(args) -> int:
    """Validate a recipe; with a cluster size, check its layout there and estimate memory, FLOPs
    and step time per GPU (docs/cluster.md); with --search, rank the layouts that fit."""
    import yaml

    from megatron_internvl.config import ConfigError, load_config
    from megatron_internvl.config.loader import config_to_dict

    if args.nodes is not None and args.world_size is not None:
        print("megatron-internvl plan: give --nodes/--gpus-per-node or --world-size, not both",
              file=sys.stderr)
        return 2
    nodes, gpus = args.nodes, args.gpus_per_node
    if nodes is None and args.world_size:
        nodes, gpus = 1, args.world_size
    try:
        config = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"megatron-internvl plan: config error: {exc}", file=sys.stderr)
        return 2
    if nodes is None:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    from megatron_internvl.planning import Hardware, make_plan, search_layouts, unfit_message
    from megatron_internvl.planning.report import format_plan, format_search

    hardware = Hardware(gpu_mem_gib=args.gpu_mem, mfu=args.mfu)
    if args.peak_tflops:
        hardware.peak_tflops = args.peak_tflops
    if args.search:
        print(format_search(search_layouts(config, nodes, gpus, hardware), args.top))
        return 0
    try:
        plan = make_plan(config, nodes, gpus, hardware)
    except ConfigError as exc:
        print(f"megatron-internvl plan: layout error: {exc}", file=sys.stderr)
        return 2
    if args.world_size:  # the resolved config, then the layout (as before --nodes existed)
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        steps = plan.micro_batches
        p = config.parallel
        print(f"# layout: TP={p.tensor_parallel} PP={p.pipeline_parallel} CP={p.context_parallel} "
              f"DP={plan.data_parallel}; {steps} micro-batches per rank per step")
    print(format_plan(config, plan, nodes, gpus))
    if not plan.fits:
        print(f"megatron-internvl plan: {unfit_message(plan)}", file=sys.stderr)
        return 3
    return 0


def _slurm(rest) -> int:
    from megatron_internvl.launch.slurm import main as slurm_main

    return slurm_main(rest)


def _doctor(rest) -> int:
    from megatron_internvl.launch.doctor import main as doctor_main

    return doctor_main(rest)


def _convert(rest) -> int:
    from megatron_internvl.convert.cli import main as convert_main

    return convert_main(rest) or 0


def _inspect_data(rest) -> int:
    from megatron_internvl.data.inspection import main as inspect_main

    return inspect_main(list(rest))


def _index_data(rest) -> int:
    from megatron_internvl.data.indexing import main as index_main

    return index_main(list(rest))


def _mpo_reference(rest) -> int:
    from megatron_internvl.training.mpo.reference import main as reference_main

    return reference_main(rest)


def _evaluate(rest) -> int:
    from megatron_internvl.training.evaluate import main as evaluate_main

    return evaluate_main(rest)


def _verify_checkpoint(args) -> int:
    from megatron_internvl.checkpoint.layout import verify_report
    from megatron_internvl.config.errors import EXIT_FAULT

    lines, ok = verify_report(args.path)
    print("\n".join(lines))
    return 0 if ok else EXIT_FAULT


def _generate(rest) -> int:
    from megatron_internvl.training.generate import main as generate_main

    return generate_main(rest)


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

    plan = sub.add_parser(
        "plan", help="validate a recipe's layout for a cluster; memory, FLOPs and step time per GPU",
        description="Without a cluster size: print the resolved config. With --nodes N "
        "--gpus-per-node G (or --world-size N): check the layout there and estimate per GPU the "
        "weights, gradients, optimizer state, activations, output layer + loss and the peak, the "
        "FLOPs per step and the step time at an assumed MFU (docs/cluster.md). Exit code 3: the "
        "layout does not fit in --gpu-mem.")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--world-size", type=int, default=None,
                      help="check the layout for N processes (one node of N GPUs) and print the config")
    plan.add_argument("--nodes", type=int, default=None, help="number of nodes")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80: H100)")
    plan.add_argument("--mfu", type=float, default=0.35, help="assumed MFU for the step time (0.35)")
    plan.add_argument("--peak-tflops", type=float, default=None,
                      help="dense BF16 TFLOP/s per GPU (default 989: H100/H200)")
    plan.add_argument("--search", action="store_true",
                      help="rank the layouts that fit by estimated step time")
    plan.add_argument("--top", type=int, default=10, help="layouts --search prints (10)")
    plan.set_defaults(func=_plan)

    sub.add_parser("slurm", help="render (--dry-run) or submit (--submit) the sbatch script for a recipe "
                   "(see `slurm --help`)", add_help=False)
    sub.add_parser("convert", help="Hugging Face <-> Megatron checkpoints (see `convert --help`)",
                   add_help=False)
    sub.add_parser("doctor", help="what a run on this machine would use (versions, GPU, spec, kernels, "
                   "optimizer, image decoder) and known-bad combinations ([RECIPE] [--json])", add_help=False)
    sub.add_parser("inspect-data", help="statistics of a data mixture (see `inspect-data --help`)",
                   add_help=False)
    sub.add_parser("index-data", help="build the offline sample index of a mixture, data.index_path "
                   "(see `index-data --help`)", add_help=False)
    sub.add_parser("mpo-reference", help="precompute the MPO reference log-probs of every preference pair "
                   "(mpo.reference=precomputed; RECIPE.yaml [overrides], torchrun for several processes)",
                   add_help=False)
    sub.add_parser("evaluate", help="validation loss of a checkpoint (RECIPE.yaml checkpoint.load=DIR "
                   "evaluation.meta_path=META [overrides]; torchrun for several processes)", add_help=False)
    sub.add_parser("generate", help="greedy answer of a checkpoint to a prompt with images (CHECKPOINT "
                   "--image PATH --prompt TEXT; torchrun N processes for TP=N)", add_help=False)
    sub.add_parser("filter-data", help="flag anomalous samples of a mixture for review (see `filter-data --help`)",
                   add_help=False)
    sub.add_parser("filter-apply", help="apply a reviewed filter-data run, write a new meta JSON",
                   add_help=False)
    verify = sub.add_parser(
        "verify-checkpoint", help="check a checkpoint (or every one in a save directory) against the "
        "sizes and BLAKE2b hashes in its complete.json",
        description="Exit code 0: every checkpoint verifies; 4: one is damaged (named, with the file).")
    verify.add_argument("path", help="a checkpoint (iter_NNNNNNN) or a save directory")
    verify.set_defaults(func=_verify_checkpoint)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 ok, 2 configuration or input (the message names the field or path), 3 `plan`:
    the layout does not fit, 4 a fault (full disk, damaged checkpoint, I/O), 42 `train` stopped
    after a save (requeue). `--debug` or MI_DEBUG=1 shows the traceback of an error."""
    from megatron_internvl.config.errors import run_reporting

    return run_reporting("megatron-internvl", _dispatch, list(sys.argv[1:] if argv is None else argv))


def _dispatch(argv) -> int:
    # Subcommands with their own parsers get the rest of the line untouched.
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    if argv and argv[0] == "slurm":
        return _slurm(argv[1:])
    if argv and argv[0] == "doctor":
        return _doctor(argv[1:])
    if argv and argv[0] == "inspect-data":
        return _inspect_data(argv[1:])
    if argv and argv[0] == "index-data":
        return _index_data(argv[1:])
    if argv and argv[0] == "filter-data":
        return _filter_data(argv[1:])
    if argv and argv[0] == "mpo-reference":
        return _mpo_reference(argv[1:])
    if argv and argv[0] == "evaluate":
        return _evaluate(argv[1:])
    if argv and argv[0] == "generate":
        return _generate(argv[1:])
    if argv and argv[0] == "filter-apply":
        return _filter_apply(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
