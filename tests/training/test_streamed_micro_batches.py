"""Micro-batches streamed through the schedule (each one's tiles moved to the device when megatron's
schedule asks for it) give bit for bit the losses of the whole step staged on the device first.
The streamed run also decodes its JPEGs in the training process (`data.decode_on=rank`: the
workers hand over the bytes, the fetch decodes them before the tensor-parallel broadcast)."""

from training.runner import step_records

STEPS = ("training.exit_interval=2", "training.global_batch_size=4")


def test_streamed_equals_staged_at_tp2_x_pp2(trainer, tmp_path):
    runs = {}
    # prefetch 0: a micro-batch's tiles reach the device only when the schedule asks for it;
    # prefetch 8 (> the 4 micro-batches): the whole step's tiles at the first request (staged)
    for name, prefetch, decode_on in (("streamed", 0, "rank"), ("staged", 8, "worker")):
        trainer(tmp_path / name, 4, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", *STEPS,
                f"training.micro_batch_prefetch={prefetch}", f"data.decode_on={decode_on}", expect_rc=42)
        runs[name] = step_records(tmp_path / name)
    streamed, staged = runs["streamed"], runs["staged"]
    assert sorted(streamed) == sorted(staged) == [1, 2]
    for s in (1, 2):
        assert streamed[s]["tiles"] > 0
        for key in ("loss", "grad_norm", "dataset_loss", "tokens", "tiles"):
            assert streamed[s][key] == staged[s][key], (s, key, streamed[s][key], staged[s][key])
