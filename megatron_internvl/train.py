"""`python -m megatron_internvl.train RECIPE.yaml [section.key=value ...]` (torchrun / srun)."""

import sys

from megatron_internvl.training.main import main

if __name__ == "__main__":
    sys.exit(main())
