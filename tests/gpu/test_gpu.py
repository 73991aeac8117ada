"""What only a GPU can check: the Transformer Engine spec, BF16 and FP8 training, DALI GPU decode.

Run on a GPU machine with ``python -m pytest tests/gpu -v -s``. Written without a GPU: these
tolerances are first guesses; a failure here is information, report the numbers it prints.
"""

import sys

import pytest
import torch

from harness import run_ranks
from training.runner import ROOT, Trainer, step_records

sys.path.insert(0, str(ROOT / "tests"))


def _te_and_local_logits(hf_dir, ckpt, batches):
    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.convert.checkpoint import build_chunk, load_weights
    from megatron_internvl.convert.forward import check_inputs, forward_logits
    from megatron_internvl.convert.importer import convert_on_rank, plan
    from megatron_internvl.parallel import distributed

    hf, job, _ = plan(hf_dir, 1, 1, None)
    job.out_dir = ckpt
    convert_on_rank(job)
    parallel = ParallelConfig()
    distributed.initialize(parallel)
    out = {}
    for spec in ("te", "local"):
        hf.model.spec = spec
        model = build_chunk(hf.model, parallel, "bf16").cuda()
        load_weights(model, ckpt)
        out[spec] = {name: forward_logits(model, {k: v.cuda() for k, v in check_inputs(b, hf.model).items()},
                                          hf.model).cpu()
                     for name, b in batches.items()}
        del model
    return out


def test_te_spec_bf16_matches_transformers_and_local_spec(tmp_path):
    from convert import models

    hf_dir = tmp_path / "hf"
    model = models.save_tiny(hf_dir, "qwen2", models.VIT_300M, seed=1)
    batches = models.inputs()
    ref = models.reference_logits(model, batches)  # fp32, CPU, transformers
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (logits,) = run_ranks(_te_and_local_logits, 1, str(hf_dir), str(ckpt), batches, timeout=600)
    for name in batches:
        te, local = logits["te"][name], logits["local"][name]
        e_ref, e_local = models.rel_l2(te, ref[name]), models.rel_l2(te, local)
        print(f"[gpu] {name}: TE bf16 vs transformers fp32 {e_ref:.2e}; TE vs local spec (bf16) {e_local:.2e}")
        assert e_ref <= 3e-2 and e_local <= 3e-2


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples" / "tiny"))
    from make_dataset import build

    return Trainer(build(tmp_path_factory.mktemp("tiny-data")))


@pytest.fixture(scope="module")
def losses(trainer, tmp_path_factory):
    """30 steps of the tiny recipe per (precision, spec), run once each."""
    cache = {}

    def run(precision, spec):
        if (precision, spec) not in cache:
            run_dir = tmp_path_factory.mktemp(f"{precision}-{spec}")
            trainer(run_dir, 1, f"training.precision={precision}", f"model.spec={spec}",
                    "training.train_steps=30", timeout=600)
            recs = step_records(run_dir)
            cache[precision, spec] = [recs[s]["loss"] for s in sorted(recs)]
            print(f"[gpu] {precision} {spec}: loss {cache[precision, spec][0]:.4f} -> "
                  f"{cache[precision, spec][-1]:.4f}; {recs[max(recs)]['tokens_per_s']:.0f} tokens/s at the last step")
        return cache[precision, spec]

    return run


def _max_rel_diff(a, b):
    assert len(a) == len(b) == 30
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_te_bf16_training_follows_fp32(losses):
    """The TE spec in BF16 against the local spec in fp32, same weights and data, every step."""
    diff = _max_rel_diff(losses("bf16", "te"), losses("fp32", "local"))
    print(f"[gpu] TE BF16 vs local fp32: at most {diff:.2%} apart")
    assert diff <= 0.05


def test_fp8_training_follows_bf16(losses):
    """FP8 (hybrid, delayed scaling) against BF16 on the TE spec at equal steps."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+ (Ada, Hopper)")
    diff = _max_rel_diff(losses("fp8", "te"), losses("bf16", "te"))
    print(f"[gpu] FP8 vs BF16 (TE): at most {diff:.2%} apart")
    assert diff <= 0.02


def test_dali_gpu_decode_matches_pil():
    pytest.importorskip("nvidia.dali")
    from data.test_images import DALI_TOL_MAX, DALI_TOL_MEAN, PHOTOS

    from megatron_internvl.data.images import DALIDecoder, load_image_tiles

    dali = DALIDecoder(device="gpu")
    for name, path in PHOTOS.items():
        for max_tiles in (1, 12):
            a = load_image_tiles(path, max_tiles=max_tiles, backend="pil")
            b = load_image_tiles(path, max_tiles=max_tiles, backend=dali)
            diff = (a - b).abs()
            print(f"[gpu] DALI mixed vs PIL, {name}, max_tiles={max_tiles}: max {diff.max():.3f} mean {diff.mean():.4f}")
            assert a.shape == b.shape
            assert diff.max().item() <= DALI_TOL_MAX and diff.mean().item() <= DALI_TOL_MEAN
    assert dali.stats["dali"] > 0
