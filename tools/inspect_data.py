"""Dry-run the data pipeline over a meta file: samples, tiles, tokens, packs, skips, fill.

    python tools/inspect_data.py --meta META.json --tokenizer PATH --max-tokens 16384 \
        --max-tiles 48 [--num-samples K] [--json]

The same as `megatron-internvl inspect-data`; the program is `megatron_internvl.data.inspection`.
"""

import sys

from megatron_internvl.data.inspection import main

if __name__ == "__main__":
    sys.exit(main())
