"""Hugging Face <-> Megatron checkpoint conversion.

- :mod:`.tables`: one declarative table per checkpoint format (HF name <-> canonical megatron
  name, with a transform kind);
- :mod:`.transforms`: the transform kinds (fused QKV, gate/up stacking, ...);
- :mod:`.mapping`: a table expanded for one model config, with the checks on names and shapes;
- :mod:`.hf_config`: format detection and ``config.json`` <-> :class:`ModelConfig`;
- :mod:`.importer` / :mod:`.exporter` / :mod:`.forward`: what the command-line tools run.

TP splitting and PP placement are not here: :mod:`megatron_internvl.parallel.sharding` moves
full tensors in and out of any layout from megatron's own sharding metadata.
"""

from megatron_internvl.config.errors import InternVLError


class ConversionError(InternVLError, ValueError):
    """A user-caused conversion problem (input checkpoint, layout, paths); the message names the
    tensor, file or field and what to do."""
