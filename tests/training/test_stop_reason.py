"""The stop reason is agreed across ranks: the signal one rank received names the stop on all."""

import torch

from harness import run_ranks


def _agree(received_by_rank):
    from megatron_internvl.training import signals

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    if rank is None:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    signals._received = received_by_rank[rank]
    request = signals.StopRequest(time_limit_minutes=0.0 if rank == 0 else None)
    return request.should_stop()


def test_every_rank_names_the_signal_another_rank_got():
    # Rank 0 only reached its time limit; rank 1 got SIGUSR1: both report SIGUSR1.
    assert run_ranks(_agree, 2, [None, "SIGUSR1"]) == ["SIGUSR1", "SIGUSR1"]
    assert run_ranks(_agree, 2, ["SIGTERM", None]) == ["SIGTERM", "SIGTERM"]


def test_one_process_and_nothing_received():
    import signal

    from megatron_internvl.training import signals

    saved = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}  # StopRequest installs its own
    signals._received = None
    assert signals.StopRequest().should_stop() is None
    assert signals.StopRequest(time_limit_minutes=0.0).should_stop() == "time limit"
    signals._received = "SIGTERM"
    try:
        assert signals.StopRequest().should_stop() == "SIGTERM"
    finally:
        signals._received = None
        for sig, handler in saved.items():
            signal.signal(sig, handler)
