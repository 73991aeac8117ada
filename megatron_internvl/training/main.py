"""`megatron-internvl train RECIPE.yaml [section.key=value ...]`: load the config, set the run up
(`setup.py`), train (`loop.py`); user errors end in one message and their exit code
(`config/errors.py`)."""

from __future__ import annotations

import logging
import sys

from megatron_internvl.config import Config, load_config
from megatron_internvl.config.errors import run_reporting

from .loop import train
from .setup import setup


def run(config: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    return train(setup(config))


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 configuration / input / non-finite abort, 4 a fault (full disk,
    damaged checkpoint), 42 stopped after a save (requeue). ``--debug`` or ``MI_DEBUG=1``: tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m megatron_internvl.train RECIPE.yaml [section.key=value ...] [--debug]")
        return 0
    return run_reporting("megatron-internvl train", lambda a: run(load_config(a[0], a[1:])), argv)
