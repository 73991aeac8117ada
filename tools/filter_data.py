"""Filter an InternVL mixture, then apply the review (see docs/data.md, "Filtering a mixture").

    python tools/filter_data.py --meta META.json --out DIR [--rules RULES.yaml] [--scorer MODEL_DIR] [--workers N]
    python tools/filter_data.py apply --review DIR --out NEW_DIR
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_internvl.data.quality.cli import apply_main, filter_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "apply":
        return apply_main(argv[1:])
    return filter_main(argv)


if __name__ == "__main__":
    sys.exit(main())
