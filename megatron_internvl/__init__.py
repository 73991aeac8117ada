"""megatron-internvl: InternVL-family vision-language model training on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import on every machine without TE/apex; on CPU that is expected.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
