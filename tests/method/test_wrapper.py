"""TVMWrapper options that must not change the function: activation recomputation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import one_hot, tiny_dit, tiny_wrapper
from tvm.method.times import Guidance, TimeSampling, draw_step
from tvm.method.wrapper import TVMWrapper


def loss_and_grads(net: TVMWrapper, teacher: TVMWrapper) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)
    draws = draw_step(gen, 4, (2, 8, 8), TimeSampling(), Guidance(cfg=2.0), "cpu")
    draws = dataclasses.replace(
        draws,
        **{
            f.name: getattr(draws, f.name).double()
            for f in dataclasses.fields(draws)
            if getattr(draws, f.name).is_floating_point()
        },
    )
    loss = net(x, one_hot([0, 1, 2, 3]), draws, teacher)["loss"]
    loss.sum().backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("jvp_mode,recompute", [("explicit", "fm"), ("explicit", "all"), ("autograd", "fm")])
def test_recomputation_leaves_loss_and_gradients_unchanged(jvp_mode, recompute):
    base = tiny_wrapper()
    base.jvp_mode = jvp_mode
    teacher = copy.deepcopy(base).eval()
    ref_loss, ref_grads = loss_and_grads(base, teacher)
    other = tiny_wrapper()
    other.jvp_mode, other.recompute = jvp_mode, recompute
    loss, grads = loss_and_grads(other, teacher)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-12, atol=1e-15)


def test_recomputation_saves_activation_memory():
    """Fewer tensors stay saved for the backward (counted with saved-tensor hooks)."""

    def saved_bytes(recompute: str) -> int:
        net = tiny_wrapper(depth=4)
        net.recompute = recompute
        teacher = copy.deepcopy(net).eval()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_and_grads(net, teacher)
        return total

    none, fm, every = saved_bytes("none"), saved_bytes("fm"), saved_bytes("all")
    assert every < fm < none, (none, fm, every)


def test_bad_recompute_settings_are_refused():
    with pytest.raises(ValueError, match="unknown recompute"):
        TVMWrapper(tiny_dit(), recompute="some")
    with pytest.raises(ValueError, match="needs jvp_mode='explicit'"):
        TVMWrapper(tiny_dit(), jvp_mode="autograd", recompute="all")
