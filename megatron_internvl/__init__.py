"""megatron-internvl: InternVL-family vision-language model training on Megatron-Core."""

__version__ = "0.1.0"
