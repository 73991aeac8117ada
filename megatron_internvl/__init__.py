"""megatron-internvl: InternVL-family vision-language model training on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import on every machine without TE/apex; on CPU that is expected.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
# The CPU layer touches `.grad` of non-leaf tensors through its function mode; torch's gloo
# wrappers warn about their own renamed collectives. Neither is actionable for users.
warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf.*")
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*deprecated.*")

