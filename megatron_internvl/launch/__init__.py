"""Launching jobs on clusters (Slurm)."""
