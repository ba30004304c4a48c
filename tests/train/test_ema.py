"""EMA updates (docs/method.md §5.2 items 8–9, §12 item 26)."""

import torch

from tvm.train.ema import make_ema, update_ema_


def test_ema_update_is_upstreams_lerp_and_skips_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = make_ema(net)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    prev = [p.clone() for p in ema.parameters()]
    update_ema_(ema, net, 0.9999)
    for p_ema, p_prev, p_net in zip(ema.parameters(), prev, net.parameters()):
        assert torch.equal(p_ema, torch.lerp(p_net, p_prev, 0.9999))
        torch.testing.assert_close(p_ema, 0.9999 * p_prev + 0.0001 * p_net)
    prev = [p.clone() for p in ema.parameters()]
    update_ema_(ema, net, 0.99, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), prev))
    update_ema_(ema, net, 0.99, skip=torch.tensor(False))
    for p_ema, p_prev, p_net in zip(ema.parameters(), prev, net.parameters()):
        assert torch.equal(p_ema, torch.lerp(p_net, p_prev, torch.tensor(0.99)))


def _reference_update(ema_values, net_values, beta, skip):
    """Upstream's update, out of place: ``lerp(p_net, p_ema, β)`` (weight 1 where skipped)."""
    weight = beta if skip is None else torch.where(skip, 1.0, beta).to(ema_values[0].dtype)
    return [torch.lerp(n, e, weight) for e, n in zip(ema_values, net_values)]


def test_in_place_update_has_upstreams_bits_for_every_beta_dtype_and_skip():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for beta in (0.9999, 0.999, 0.99, 0.9, 0.5, 0.3, 0.0, 1.0):
            for skip in (None, torch.tensor(False), torch.tensor(True)):
                net = torch.nn.ParameterList(
                    [torch.nn.Parameter(torch.randn(2000, generator=gen, dtype=dtype) * s) for s in (1e-3, 1.0, 30.0)]
                )
                ema = torch.nn.ParameterList(
                    [
                        torch.nn.Parameter(p.detach() + torch.randn(p.shape, generator=gen, dtype=dtype) * 1e-2)
                        for p in net
                    ]
                )
                expected = _reference_update([p.detach().clone() for p in ema], [p.detach() for p in net], beta, skip)
                update_ema_(ema, net, beta, skip)
                for got, want in zip(ema.parameters(), expected):
                    assert torch.equal(got, want), (dtype, beta, skip)


def test_both_emas_in_one_pass_equal_the_per_tensor_updates():
    """``update_emas_`` with the EMA kernel on the CPU (kernels/ema.py; the Triton interpreter here, whose fused
    multiply-add rounds twice, so to within two fp32 roundings; bit for bit on a GPU: tests/kernels/test_ema.py):
    the eval EMA and the teacher, or the eval EMA alone, as two per-tensor passes give them; a parameter the
    kernel does not take (3 elements) exactly so; a skipped step changes nothing."""
    from kernels import ema as ema_kernel
    from tvm.train.ema import fused_ema_devices, update_emas_

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 3))  # last bias: 3 elements
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    for betas in ((0.9999, 0.99), (0.999,), (0.3, 0.7)):
        emas = {fused: [make_ema(net) for _ in betas] for fused in (False, True)}
        ema_kernel._PLANS.clear()
        for fused, modules in emas.items():
            with fused_ema_devices(("cpu",) if fused else ()):
                update_emas_(net, list(zip(modules, betas)), torch.tensor(False))
                frozen = [[p.clone() for p in m.parameters()] for m in modules]
                update_emas_(net, list(zip(modules, betas)), torch.tensor(True))
                assert all(torch.equal(a, b) for m, old in zip(modules, frozen) for a, b in zip(m.parameters(), old))
        ((table, _, left),) = ema_kernel._PLANS.values()  # the kernel ran, on all but the last bias
        assert len(table) == 3 and left == (3,)
        for per_tensor, one_pass in zip(emas[False], emas[True]):
            params = list(zip(per_tensor.parameters(), one_pass.parameters()))
            assert torch.equal(*params[-1])  # the 3-element bias: per tensor in both
            for a, b in params[:-1]:
                torch.testing.assert_close(b, a, rtol=3e-7, atol=1e-7)
