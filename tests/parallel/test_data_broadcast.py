"""One data reader per model replica: TP x PP ranks receive the reader's packs (4 gloo ranks)."""

import sys

import torch

from harness import run_ranks
from training.runner import ROOT


def _broadcast_worker(data_dir):
    sys.path.insert(0, str(ROOT / "tests"))
    from megatron.core import parallel_state as ps

    from megatron_internvl.config import ParallelConfig, load_config
    from megatron_internvl.data.dataset import DataSkipRatioError, build_data_loader
    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.data import BroadcastLoader

    cfg = load_config(str(ROOT / "examples" / "tiny" / "full.yaml"),
                      [f"data.meta_path={data_dir}/meta.json", f"data.tokenizer_path={data_dir}/tokenizer.json"])
    distributed.initialize(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), seed=1)
    built = []

    def build():
        built.append(torch.distributed.get_rank())
        return build_data_loader(cfg.data)

    loader = BroadcastLoader(build)
    local = build_data_loader(cfg.data)  # what this rank would have read itself
    out = {"built": built, "names": loader.dataset_names == local.dataset_names, "mismatch": [],
           "first_stage": ps.is_pipeline_first_stage(ignore_virtual=True), "pixels": []}
    for step in range(4):
        got, want = next(loader), next(local)
        if set(got) != set(want):
            out["mismatch"].append((step, "keys"))
        for key, value in want.items():
            if key == "pixel_values":
                out["pixels"].append((tuple(got[key].shape), tuple(value.shape)))
                if out["first_stage"] and not torch.equal(got[key], value):
                    out["mismatch"].append((step, key))
            elif isinstance(value, torch.Tensor):
                if not torch.equal(got[key], value):
                    out["mismatch"].append((step, key))
            elif got[key] != value:
                out["mismatch"].append((step, key))
    if loader.is_source:
        out["state_equal"] = loader.state_dict() == local.state_dict()

    class Failing:
        dataset_names = ["a"]

        def __next__(self):
            raise DataSkipRatioError("dataset 'a': 60% of samples skipped")

    failing = BroadcastLoader(Failing)
    try:
        next(failing)
        out["error"] = None
    except DataSkipRatioError as exc:
        out["error"] = str(exc)

    def broken_build():
        raise FileNotFoundError("meta.json not found")

    try:
        BroadcastLoader(broken_build)
        out["build_error"] = None
    except FileNotFoundError as exc:
        out["build_error"] = str(exc)
    return out


def test_packs_read_once_and_received_everywhere(tmp_path):
    sys.path.insert(0, str(ROOT / "examples" / "tiny"))
    from make_dataset import build

    data = build(tmp_path / "data")
    results = run_ranks(_broadcast_worker, 4, str(data), timeout=300)
    # Megatron's rank order is tp fastest, pp slowest: ranks 0,1 first stage; 0 is the reader.
    assert [r["built"] for r in results] == [[0], [], [], []]
    for rank, r in enumerate(results):
        assert r["names"], rank
        assert r["mismatch"] == [], (rank, r["mismatch"])
        for got, want in r["pixels"]:
            if r["first_stage"]:
                assert got == want
            else:
                assert got == (want[0], 3, 0, 0), "later stages keep the tile count, not the pixels"
        assert r["error"] == "dataset 'a': 60% of samples skipped", rank
        assert r["build_error"] == "meta.json not found", rank
    assert results[0]["state_equal"]
    assert any(want[0] > 0 for _, want in results[0]["pixels"]), "the test must carry images"
