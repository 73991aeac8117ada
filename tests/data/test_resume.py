"""Exact resume: save after 40 micro-batches, restore in a fresh process, the next 10 match."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_internvl.data.dataset import DataResumeError, build_data_loader

from .helpers import FakeMedia, batch_digest, make_toy_data, toy_config, train_bpe

CHILD = os.path.join(os.path.dirname(__file__), "resume_child.py")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    # small datasets, so 50 micro-batches run over several epochs
    meta = make_toy_data(str(d), n_single=12, n_multi=4, n_text=6, n_video=3, n_pretrain=3, n_corpus=6)
    return meta, train_bpe(str(d / "tok" / "tokenizer.json"))


def _cfg(toy, **kw):
    meta, tok = toy
    return toy_config(meta, tok, v2pe="random", pack_buffer_size=8, **kw)


@pytest.mark.timeout(180)
def test_resume_in_fresh_process_bit_identical(toy, tmp_path):
    cfg = _cfg(toy, num_workers=2)
    loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size))
    for _ in range(40):
        next(loader)
    state = loader.state_dict()
    assert state["packer"]["packs"], "the pack buffer should hold partial packs at step 40"
    assert loader.order.samples_per_epoch < state["next_index"]      # past an epoch boundary
    state_path = str(tmp_path / "state.pt")
    torch.save(state, state_path)
    expected = [batch_digest(next(loader)) for _ in range(10)]

    for workers in (2, 0, 1):   # the same and a different number of DataLoader workers
        out = str(tmp_path / f"out{workers}.pt")
        subprocess.run([sys.executable, CHILD, *toy, state_path, out, str(workers), "10"], check=True,
                       timeout=120, env={**os.environ, "PYTHONHASHSEED": str(workers + 11)})
        got = torch.load(out, weights_only=False)
        assert got == expected, f"resumed stream differs with {workers} workers"


def test_resume_with_pending_pieces_and_skip_counts(toy, tmp_path):
    """A long document split into pieces can be half-packed at a checkpoint."""
    cfg = _cfg(toy, num_workers=0, max_tokens=64, max_tiles=4, pad_to_multiple=8)
    loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size))
    for step in range(400):
        next(loader)
        st = loader.state_dict()
        if st["pending"] and st["skips"]["skipped"]:
            break
    state = loader.state_dict()
    assert state["pending"], "expected a checkpoint with pieces of a split document still pending"
    assert state["skips"]["skipped"] > 0   # tiny budgets: some conversations are over budget
    expected = [batch_digest(next(loader)) for _ in range(12)]
    expected_stats = loader.stats()
    fresh = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size), state=state)
    assert [batch_digest(next(fresh)) for _ in range(12)] == expected
    assert fresh.stats() == expected_stats


def test_resume_refuses_another_layout(toy):
    cfg = _cfg(toy, num_workers=0)
    loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size))
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataResumeError, match="dp_size=1 but this run has 2"):
        build_data_loader(cfg, dp_rank=0, dp_size=2, media_loader=FakeMedia(cfg.image_size), state=state)
    other = _cfg(toy, num_workers=0, seed=99)
    with pytest.raises(DataResumeError, match="seed"):
        build_data_loader(other, media_loader=FakeMedia(cfg.image_size), state=state)
