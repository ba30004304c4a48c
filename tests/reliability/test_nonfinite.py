"""Fault 3: NaN or inf injected on one rank of a 2-process (gloo) DDP run, into a batch or a gradient.

Documented outcome (tvm/train/loop.py, README): a step with a non-finite loss on any rank or a
non-finite gradient is skipped on device on every rank alike (fused AdamW's ``found_inf``, EMA weight
1) and counted; ``training.max_nonfinite_in_row`` consecutive skipped steps stop the run on every
rank with ``NonFiniteLossError`` (checked once per tick); no NaN reaches the weights, the EMAs or a
checkpoint; the ranks never diverge and never wait for each other; and the policy costs no host
synchronisation per step.

The injection is a test-only patch inside rank 1: a non-finite value written into one image of its
micro-batch, or a hook that replaces one parameter's local gradient before DDP's all-reduce.
``tests/train/test_loop.py`` covers the one-process policy; this file covers the ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fault_tools import HostReadCounter, all_finite, load_every_checkpoint, watchdog
from helpers import QUICK_TINY, fork_ranks

STEPS_PER_TICK = 4
RUN = QUICK_TINY + [
    "training.kimg_per_tick=0.064",
    "training.total_ticks=3",
    "training.ckpt_ticks=1",
    "training.max_nonfinite_in_row=3",
    f"training.preempt_check_steps={STEPS_PER_TICK}",
]


def _rank(rank: int, run_dir: Path, out_dir: Path, inject: dict[int, str]) -> None:
    """One training rank; on rank 1, ``inject[step]`` poisons that step. Writes ``rank<r>.json/.pt``."""
    watchdog(120)
    torch.set_num_threads(1)
    import tvm.train.loop as loop
    from tvm.config import compose_config
    from tvm.runtime.checkpoint import module_state_dict
    from tvm.train.update import NonFiniteLossError

    counter = HostReadCounter().install()
    step = 0
    hooks: list[Any] = []
    record: dict[str, Any] = {"rank": rank, "skips": [], "unchanged": {}, "reads": [], "error": None}
    real_forward, real_apply = loop.TVMWrapper.forward, loop.apply_update
    captured: dict[str, Any] = {}

    def forward(self, *inputs, phase="loss"):
        if phase == "fm":  # the flow-matching term of a split backward: its inputs come from the first phase
            return real_forward(self, *inputs, phase=phase)
        x, labels, draws, teacher = inputs
        kind = inject.get(step) if rank == 1 else None
        if kind in ("nan-batch", "inf-batch"):
            x = x.clone()
            x[0] = float("nan") if kind == "nan-batch" else float("inf")  # one corrupt image
        elif kind in ("nan-grad", "inf-grad"):
            value = float("nan") if kind == "nan-grad" else float("inf")
            weight = self.model.final_layer.linear.weight  # runs before DDP's all-reduce of this gradient
            hooks.append(weight.register_hook(lambda grad: torch.full_like(grad, value)))
        return real_forward(self, x, labels, draws, teacher, phase=phase)

    def apply_update(state, *args, **kwargs):
        nonlocal step
        captured["state"] = state
        modules = (state.net, state.ema, state.teacher)
        with counter.paused():
            before = [p.detach().clone() for m in modules for p in m.parameters()] if step in inject else None
        update = real_apply(state, *args, **kwargs)
        with counter.paused():
            for handle in hooks:
                handle.remove()
            hooks.clear()
            record["skips"].append(bool(update.skip))
            if before is not None:
                after = [p.detach() for m in modules for p in m.parameters()]
                record["unchanged"][step] = all(torch.equal(a, b) for a, b in zip(before, after))
        record["reads"].append(counter.count)
        step += 1
        return update

    loop.TVMWrapper.forward, loop.apply_update = forward, apply_update
    try:
        result = loop.run(compose_config("tiny", RUN + [f"run_dir={run_dir}"]))
        record["progress"] = result["progress"]
    except NonFiniteLossError as exc:
        record["error"] = str(exc)
    state = captured["state"]
    torch.save(
        {name: module_state_dict(getattr(state, name)) for name in ("net", "ema", "teacher")}
        | {"optimizer": state.optimizer.state_dict()},
        out_dir / f"rank{rank}.pt",
    )
    record["sites"] = counter.sites
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


def _run_two_ranks(tmp_path: Path, inject: dict[int, str]) -> tuple[list[dict], list[dict], Path]:
    run_dir = tmp_path / "run"
    fork_ranks(lambda rank: _rank(rank, run_dir, tmp_path, inject), world_size=2, timeout=150)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return records, states, run_dir


def _identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


SKIP_INJECT = {1: "nan-batch", 5: "inf-grad", 6: "nan-grad", 9: "inf-batch"}  # at most 2 in a row: no stop
# Known per-step host reads, owned elsewhere (reported in docs/reliability.md): torch.distributions.Normal
# validates its arguments and samples (``bool(tensor)``), 3 reads per step in the time sampler.
KNOWN_PER_STEP_READS = ("tvm/method/times.py",)


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict], Path]:
    return _run_two_ranks(tmp_path_factory.mktemp("skips"), SKIP_INJECT)


def _reads_inside_ticks(record: dict) -> list[list[str]]:
    """Sites of the host reads made between two steps of one tick (no tick end, no preemption check)."""
    bounds = record["reads"]
    return [record["sites"][a:b] for k, (a, b) in enumerate(zip(bounds, bounds[1:]), start=1) if k % STEPS_PER_TICK]


def test_nonfinite_batch_or_gradient_on_one_rank_is_skipped_on_all_ranks_alike(skipping_run, ledger) -> None:
    records, states, run_dir = skipping_run
    inject = SKIP_INJECT
    expected_skips = [step in inject for step in range(3 * STEPS_PER_TICK)]
    checkpoints = load_every_checkpoint(run_dir)
    for step, kind in inject.items():
        ok = all(r["skips"][step] and r["unchanged"][str(step)] for r in records)
        ledger.record(f"NaN/inf: {kind} on rank 1 of 2, skipped", ok and _identical(states[0], states[1]))
    for record in records:
        assert record["error"] is None and record["progress"]["skipped"] == len(inject)
        assert record["skips"] == expected_skips, record["skips"]
        assert all(record["unchanged"].values()), record["unchanged"]  # net, EMA and teacher untouched
        # Host reads belong to tick ends (status line, stats, policy check, checkpoint): none between
        # two steps of one tick, apart from the known reads of the time sampler (next test).
        unknown = [
            site for sites in _reads_inside_ticks(record) for site in sites if not site.startswith(KNOWN_PER_STEP_READS)
        ]
        assert unknown == [], f"per-step host reads at {sorted(set(unknown))}"
    assert _identical(states[0], states[1]), "the ranks diverged"
    assert all(all(torch.isfinite(t).all() for t in states[0][name].values()) for name in ("net", "ema", "teacher"))
    assert sorted(checkpoints) == [4, 8, 12]
    assert [c["progress"]["skipped"] for _, c in sorted(checkpoints.items())] == [1, 3, 4]
    assert all(all_finite(c) for c in checkpoints.values())


def test_no_host_read_between_two_steps_of_a_tick(skipping_run) -> None:
    records, _, _ = skipping_run
    for record in records:
        inside = _reads_inside_ticks(record)
        assert inside == [[]] * len(inside), sorted({site for sites in inside for site in sites})


def test_k_nonfinite_steps_in_a_row_on_one_rank_stop_every_rank(tmp_path: Path, ledger) -> None:
    """Three in a row in the middle of tick 2 (the tick then ends with a good step) stop the run at
    the end of that tick on both ranks; the checkpoint of tick 1 is the newest and holds no NaN."""
    inject = {4: "nan-batch", 5: "inf-grad", 6: "nan-grad"}
    records, states, run_dir = _run_two_ranks(tmp_path, inject)
    checkpoints = load_every_checkpoint(run_dir)
    errors = [r["error"] for r in records]
    ok = (
        all(e is not None and "3 consecutive steps had non-finite" in e and "by step 8" in e for e in errors)
        and errors[0] == errors[1]
        and sorted(checkpoints) == [4]
        and all_finite(checkpoints[4])
        and _identical(states[0], states[1])
    )
    ledger.record("NaN/inf: 3 in a row on rank 1 of 2, every rank stops", ok)
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "3 consecutive steps had non-finite" in errors[0] and "by step 8" in errors[0], errors[0]
    assert [len(r["skips"]) for r in records] == [8, 8]  # both ranks stopped after the same step
    assert sorted(checkpoints) == [4] and all_finite(checkpoints[4])
    assert _identical(states[0], states[1]), "the ranks diverged"
