"""One micro-batch's forward and backward (tvm/train/update.py: loss_and_backward), whole or per loss term."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch._functorch.config as functorch_config

from helpers import one_hot, tiny_wrapper
from tvm.method.times import Guidance, StepDraws, TimeSampling, draw_step
from tvm.train.update import loss_and_backward


def batch(dtype: torch.dtype, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, StepDraws]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=dtype)
    draws = draw_step(gen, n, (2, 8, 8), TimeSampling(), Guidance(cfg=2.0), "cpu")
    cast = {f: getattr(draws, f).to(dtype) for f in ("t", "s", "s_prime", "beta", "noise")}
    draws = StepDraws(**cast, drop=torch.tensor([True] + [False] * (n - 1)))  # one dropped label
    return x, one_hot(list(range(n))).to(dtype), draws


class LiveSavedBytes:
    """Bytes of the non-parameter tensors autograd holds for the backward, live and at their peak
    (saved-tensor hooks; a saved tensor counts until its graph is freed)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self.params:
            return t
        return _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tensor: torch.Tensor, owner: LiveSavedBytes):
        self.tensor, self.owner, self.nbytes = tensor, owner, tensor.numel() * tensor.element_size()
        owner.live += self.nbytes
        owner.peak = max(owner.peak, owner.live)

    def __del__(self):
        self.owner.live -= self.nbytes


def run(split: bool, dtype=torch.float64, fm_budget=None, net=None):
    net = net or tiny_wrapper(dtype=dtype)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    x, labels, draws = batch(dtype)
    syncs: list[bool] = []
    live = LiveSavedBytes(net.parameters())

    def sync(last: bool) -> contextlib.AbstractContextManager:
        syncs.append(last)
        return contextlib.nullcontext()

    with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
        terms = loss_and_backward(net, teacher, x, labels, draws, 1 / x.shape[0], sync, split, fm_budget)
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    return terms, grads, syncs, live


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_split_backward_gives_the_joint_gradient_and_terms(dtype, tol):
    joint, g_joint, sync_joint, _ = run(False, dtype)
    split, g_split, sync_split, _ = run(True, dtype)
    for name in ("terminal", "fm", "loss"):
        assert torch.equal(joint[name], split[name]), name  # the same forward values, bit for bit
        assert not split[name].requires_grad
    assert len(g_joint) == len(g_split) and all(g is not None for g in g_split)
    scale = max(g.abs().max() for g in g_joint)
    for a, b in zip(g_joint, g_split):
        torch.testing.assert_close(b, a, rtol=0, atol=tol * scale)  # the same sum, in another order
    # Only the micro-batch's last backward synchronises gradients.
    assert sync_joint == [True] and sync_split == [False, True]


def test_split_backward_never_holds_both_terms_activations():
    """Joint, the peak of saved bytes is what both terms' passes save; split, the larger of the two."""
    _, _, _, joint = run(False)
    _, _, _, split = run(True)
    assert joint.live == 0 and split.live == 0  # everything saved was freed by its backward
    net = tiny_wrapper()
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    x, labels, draws = batch(torch.float64)
    held = LiveSavedBytes(net.parameters())
    with torch.autograd.graph.saved_tensors_hooks(held.pack, held.unpack):
        first = net(x, labels, draws, teacher, phase="terminal")
        # What the terminal pass holds at its end and at its peak: f_ts's own graph (f_ts is used detached
        # only) is freed before the pass ends.
        terminal_end, terminal_peak, held.peak = held.live, held.peak, 0
        first["terminal"].sum().backward()
        fm = net(first["fm_target"], phase="fm")["fm"]
        fm_bytes = held.peak
        fm.sum().backward()
    assert held.live == 0 and fm_bytes > 0 and terminal_end > fm_bytes  # the JVP pass saves values and tangents
    assert joint.peak == terminal_end + fm_bytes
    assert split.peak == max(terminal_peak, fm_bytes)


def test_the_flow_matching_forward_is_compiled_under_its_own_budget():
    """``fm_budget`` is the activation memory budget while the flow-matching term's forward runs (when its
    graphs are compiled), and only then; the run's budget is back afterwards."""
    net = tiny_wrapper()
    seen = []
    velocity = net.velocity

    def recording_velocity(*args, **kwargs):
        if torch.is_grad_enabled():  # the teacher (a copy of this net) calls it without gradient
            seen.append(functorch_config.activation_memory_budget)
        return velocity(*args, **kwargs)

    net.velocity = recording_velocity  # with gradient, the online net's plain forward: the flow-matching term's
    with functorch_config.patch(activation_memory_budget=0.7):
        run(True, fm_budget=1.0, net=net)
        assert seen == [1.0] and functorch_config.activation_memory_budget == 0.7
        seen.clear()
        run(True, net=net)
        assert seen == [0.7]
