import os
import sys

# Test workers are spawned and import test modules by name.
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _stop_abandoned_data_workers():
    """After each test module, stop the worker processes of data loaders a test dropped without
    ``close()``: the garbage collector would tear them down later, in the middle of another test,
    each worker waiting out torch's 5 s join timeout (megatron_internvl.data.state.close_workers)."""
    yield
    import gc

    dataloader = sys.modules.get("torch.utils.data.dataloader")
    if dataloader is None:
        return
    for obj in gc.get_objects():
        if isinstance(obj, dataloader._MultiProcessingDataLoaderIter):
            obj._shutdown_workers()
