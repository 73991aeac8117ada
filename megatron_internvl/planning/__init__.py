"""Layout planning: validate a parallel layout for a cluster, estimate its memory per GPU and
its step time, and rank the layouts that fit (`megatron-internvl plan`, docs/cluster.md)."""

from .layout import Plan, check_cluster_layout, make_plan, unfit_message
from .memory import Hardware, stage_memory
from .params import stage_params, total_params
from .search import search_layouts

__all__ = ["Hardware", "Plan", "check_cluster_layout", "make_plan", "search_layouts",
           "stage_memory", "stage_params", "total_params", "unfit_message"]
