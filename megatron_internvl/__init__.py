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


def _source_tree_kernels() -> None:
    """The top-level kernels/ folder is the subpackage ``megatron_internvl.kernels``: setup.py
    maps it for installs (editable or not). A source checkout used without installing
    (``PYTHONPATH=.``, as the GPU check does) registers it from beside this package."""
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    source = Path(__file__).resolve().parent.parent / "kernels"
    if name in sys.modules or not (source / "fused_linear_ce" / "__init__.py").is_file():
        return
    if importlib.util.find_spec(name) is not None:  # installed
        return
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_source_tree_kernels()
