"""Fused kernels, each beside its plain-torch reference; installed as ``megatron_internvl.kernels``.

- :mod:`.fused_linear_ce`: output layer + weighted vocab-parallel cross-entropy that never holds
  the ``[tokens, vocab / TP]`` logits (chunked torch path everywhere, Triton on GPUs).
"""
