"""The MPO step in every layout against a single-process float64 computation; precomputed
reference = model reference; shared tiles = repeated tiles (one spawned pair of ranks)."""

import pytest
import torch

from harness import run_ranks
from mpo.workers import layouts


def _close(got, want, what, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}\n{m}")


@pytest.fixture(scope="module")
def ranks(tiny_data, tmp_path_factory):
    return run_ranks(layouts, 2, str(tiny_data), str(tmp_path_factory.mktemp("mpo-layouts")), timeout=600)[0]


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_step_matches_float64(ranks, layout):
    """Loss, the three terms, accuracy, delta and every gradient. Every micro-batch uses the
    delta from before the step, which then folds in both micro-batches' mean rewards: the same
    in every layout, the two micro-batches on one rank or on two."""
    got, want = ranks[layout], ranks["oracle"]["step"]
    _close(got["loss"], want["loss"], f"{layout} loss")
    for term in ("dpo", "bco", "sft"):
        _close(got["mpo"][term], want["terms"][term], f"{layout} {term}")
    assert got["mpo"]["reward_accuracy"] == want["terms"]["accuracy"]
    # delta is a small difference of fp32 sums of ~20 log-probs each: an absolute tolerance
    _close(got["mpo"]["delta"], want["delta"], f"{layout} delta", rtol=0, atol=1e-5)
    assert want["delta"] != 0
    _close(got["delta_state"]["delta"]["count"], 4.0, f"{layout} delta count")
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        _close(got["grads"][name], g, f"{layout} gradient of {name}", rtol=1e-4, atol=1e-6)
        if name.startswith("vision_model."):
            assert not g.any(), "the MPO stage keeps the ViT frozen"
    assert any(g.abs().sum() > 0 for n, g in want["grads"].items() if n.startswith("language_model."))


def test_precomputed_reference_equals_model_reference(ranks):
    model, table = ranks["tp2"], ranks["tp2_precomputed"]
    assert ranks["pairs_in_table"] == 17
    _close(table["loss"], model["loss"], "precomputed loss", rtol=1e-6)
    for term in ("dpo", "bco", "sft"):
        _close(table["mpo"][term], model["mpo"][term], f"precomputed {term}", rtol=1e-5)
    for term in ("delta", "reward_chosen", "reward_rejected"):  # differences of fp32 sums
        _close(table["mpo"][term], model["mpo"][term], f"precomputed {term}", rtol=0, atol=1e-5)
    for name, g in model["grads"].items():
        _close(table["grads"][name], g, f"precomputed gradient of {name}", rtol=1e-5, atol=1e-7)


def test_reference_precompute_continues_from_finished_chunks(ranks):
    r = ranks["resumed_table"]
    assert (r["same_ids"], r["planted_kept"], r["parts_removed"]) == (True, True, True)
    _close(r["rest"], r["full_rest"], "chunks computed after the restart (TP=2 vs PP=2)", rtol=1e-5, atol=1e-4)


def test_stale_table_is_refused_naming_what_differs(ranks):
    assert ranks["stale"] is not None and "is stale" in ranks["stale"]
    assert "checkpoint: path" in ranks["stale"] and "mpo-reference" in ranks["stale"]


def test_shared_tiles_give_the_repeated_tiles_result(ranks):
    shared, repeated = ranks["oracle"]["tiles"]
    assert repeated == 2 * shared > 0
    assert ranks["oracle"]["tiles_shared_vs_repeated"] < 1e-5
