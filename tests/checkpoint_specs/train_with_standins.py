"""``python train_with_standins.py te_extra_state,fused_adam RECIPE [overrides]``: the training entry
point with the named stand-ins of :mod:`standins` installed first ("-" for none). With
``STANDIN_REPORT=FILE`` it writes what ``set_extra_state`` received to FILE at exit."""

import atexit
import json
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import standins

    names = [n for n in sys.argv[1].split(",") if n not in ("", "-")]
    standins.install(names)
    if os.environ.get("STANDIN_REPORT"):
        atexit.register(lambda: open(os.environ["STANDIN_REPORT"], "w").write(json.dumps(dict(standins.RESTORED))))
    from megatron_internvl.training.main import main

    sys.exit(main(sys.argv[2:]))
