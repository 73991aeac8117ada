"""The data pipeline's public names in one place, for code written against the former module.

`dataset.py` used to hold the whole pipeline; it is now split by concern and this module only
re-exports (tests and external scripts import from here):

* `order`      global sample order (`GlobalOrder`)
* `samples`    sample building (`SampleBuilder`, `MediaLoader`, `Skip`, `SKIP_REASONS`)
* `stream`     the worker stream (`SampleStream`)
* `loader`     the packed loader with its state and the entry points (`PackedDataLoader`,
               `PackShardedLoader`, `build_data_loader`, `build_tokenizer`, the errors)
* `inspection` dry runs over a mixture (`HeaderOnlyMedia`, `inspect_stream`)

New code imports from those modules.
"""

from .inspection import HeaderOnlyMedia, inspect_stream
from .loader import (
    DataResumeError,
    DataSkipRatioError,
    PackedDataLoader,
    PackShardedLoader,
    SkipStats,
    build_data_loader,
    build_tokenizer,
)
from .order import GlobalOrder
from .samples import SKIP_REASONS, MediaLoader, SampleBuilder, Skip, pixels_none
from .stream import SampleStream

__all__ = [
    "SKIP_REASONS",
    "DataResumeError",
    "DataSkipRatioError",
    "GlobalOrder",
    "HeaderOnlyMedia",
    "MediaLoader",
    "PackShardedLoader",
    "PackedDataLoader",
    "SampleBuilder",
    "SampleStream",
    "Skip",
    "SkipStats",
    "build_data_loader",
    "build_tokenizer",
    "inspect_stream",
    "pixels_none",
]
