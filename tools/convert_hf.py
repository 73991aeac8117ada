"""Convert InternVL checkpoints between Hugging Face and Megatron-Core.

    python tools/convert_hf.py import --hf-dir HF --out CKPT --tp 2 --pp 2 [--first-stage-layers K]
    python tools/convert_hf.py export --ckpt CKPT --out HF2 --format transformers|remote-code

The same as ``megatron-internvl convert ...`` (see megatron_internvl/convert/cli.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The guard matters: the converter spawns ranks, and dist_checkpointing's writer spawns a
# process, and each re-imports this file.
if __name__ == "__main__":
    from megatron_internvl.convert.cli import main

    sys.exit(main())
