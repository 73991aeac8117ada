"""`python -m megatron_internvl.train RECIPE.yaml [section.key=value ...]` (torchrun / srun)."""

import sys

if __name__ == "__main__":
    from megatron_internvl.training import signals

    # Before the heavy imports: Slurm's SIGUSR1 during start-up stops the run after its first
    # step instead of killing it. (Under the guard: spawned helpers re-import this module.)
    signals.install()
    from megatron_internvl.training.main import main

    sys.exit(main())
