"""The data pipeline's public names in one place, for code written against the former module.

`dataset.py` used to hold the whole pipeline; it is now split by concern and this module only
re-exports (tests and external scripts import from here):

* `order`      global sample order (`GlobalOrder`)
* `samples`    sample building (`SampleBuilder`, `Skip`, `SKIP_REASONS`)
* `media`      media readers (`MediaLoader`, `HeaderOnlyMedia`)
* `stream`     the worker stream (`SampleStream`)
* `loader`     the per-rank packed loaders (`PackedDataLoader`, `PackShardedLoader`)
* `state`      skip accounting and the data errors (`SkipStats`, `DataSkipRatioError`,
               `DataResumeError`)
* `build`      the entry points (`build_data_loader`, `build_tokenizer`)
* `inspection` dry runs over a mixture (`inspect_stream`)

New code imports from those modules.
"""

from .build import build_data_loader, build_tokenizer
from .inspection import inspect_stream
from .loader import PackedDataLoader, PackShardedLoader
from .media import HeaderOnlyMedia, MediaLoader
from .order import GlobalOrder
from .samples import SKIP_REASONS, SampleBuilder, Skip, pixels_none
from .state import DataResumeError, DataSkipRatioError, SkipStats
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
