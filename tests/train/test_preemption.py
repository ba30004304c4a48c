"""Preemption signal handling and cross-rank stop agreement (tvm/train/preemption.py)."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest

from helpers import run_gloo_workers
from tvm.train import preemption
from tvm.train.preemption import PreemptionHandler


def _wait_for(condition, timeout: float = 2.0) -> bool:
    """Python runs signal handlers between bytecodes; give the interpreter a moment."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_signal_sets_flag_and_uninstall_restores(sig: signal.Signals) -> None:
    def sentinel(signum, frame):
        raise AssertionError("the previous handler must not run while ours is installed")

    previous = signal.signal(sig, sentinel)
    try:
        handler = PreemptionHandler().install()
        assert not handler.requested()
        os.kill(os.getpid(), sig)
        assert _wait_for(handler.requested)
        assert handler.signal_name == sig.name
        handler.uninstall()
        assert signal.getsignal(sig) is sentinel
    finally:
        signal.signal(sig, previous)


def test_first_sigint_stops_with_notice_second_aborts_at_once(capfd) -> None:
    """Ctrl-C: the first one asks for a checkpointed stop (rank 0 says so on stderr), the second raises
    KeyboardInterrupt at once; afterwards the previous handler (Python's) is back."""
    before = signal.getsignal(signal.SIGINT)
    handler = PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(handler.requested)
        assert handler.signal_name == "SIGINT"
        assert "SIGINT: stopping at the next step boundary with a checkpoint" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, timeout=2.0)
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.SIGINT in preemption.DEFAULT_SIGNALS


def test_data_loader_workers_leave_ctrl_c_to_the_trainer() -> None:
    previous = signal.getsignal(signal.SIGINT)
    try:
        preemption.ignore_interrupts(0)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_context_manager_restores_default() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals=(signal.SIGUSR1,)) as handler:
        assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
    assert signal.getsignal(signal.SIGUSR1) == before


def test_should_stop_checks_only_every_k_steps(monkeypatch) -> None:
    reduced_at: list[int] = []
    step_now = 0

    def fake_all_reduce_max_(tensor):
        reduced_at.append(step_now)
        return tensor

    monkeypatch.setattr(preemption.distributed, "all_reduce_max_", fake_all_reduce_max_)
    handler = PreemptionHandler()
    answers = {}
    for step_now in range(1, 23):
        if step_now == 12:
            handler.request()
        answers[step_now] = handler.should_stop(step_now, check_every=5)
    assert reduced_at == [5, 10, 15]  # no collective after the agreed stop
    assert [s for s, stop in answers.items() if stop] == list(range(15, 23))
    assert handler.requested()
    with pytest.raises(ValueError, match="check_every"):
        handler.should_stop(1, check_every=0)


_WORKER = textwrap.dedent(
    """
    import json, os, signal, torch
    from tvm.runtime import distributed as D
    from tvm.train.preemption import PreemptionHandler
    ctx = D.init_distributed(device="cpu")
    handler = PreemptionHandler().install()
    stops = []
    for step in range(1, 13):
        if ctx.rank == 1 and step == 6:
            os.kill(os.getpid(), signal.SIGUSR2)
        stops.append(handler.should_stop(step, check_every=4))
    print("RESULT " + json.dumps({"rank": ctx.rank, "local": handler.requested(), "stops": stops}), flush=True)
    D.cleanup()
    """
)


def test_ranks_agree_when_one_rank_is_signalled() -> None:
    results = sorted(run_gloo_workers(_WORKER), key=lambda r: r.get("rank", 0))
    assert [r["local"] for r in results] == [False, True]
    expected = [False] * 7 + [True] * 5  # signal at step 6, first check after it at step 8
    assert [r["stops"] for r in results] == [expected, expected]
