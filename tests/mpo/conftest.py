import sys

import pytest

from training.runner import ROOT

sys.path.insert(0, str(ROOT / "examples" / "tiny"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from make_dataset import build

    return build(tmp_path_factory.mktemp("tiny-data-mpo"))
