"""`megatron-internvl train RECIPE.yaml [section.key=value ...]`: load the config, set the run up
(`setup.py`), train (`loop.py`); user errors end in one message and exit code 2."""

from __future__ import annotations

import logging
import sys

from megatron_internvl import checkpoint as ckpt
from megatron_internvl.config import Config, ConfigError, load_config

from .loop import TrainingAborted, train
from .setup import setup


def run(config: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    return train(setup(config))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m megatron_internvl.train RECIPE.yaml [section.key=value ...]")
        return 0
    try:
        return run(load_config(argv[0], argv[1:]))
    except (ConfigError, ckpt.CheckpointError, TrainingAborted) as exc:
        print(f"megatron-internvl train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
