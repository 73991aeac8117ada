"""The sbatch templates, installed as package data of ``megatron_internvl.slurm``."""
