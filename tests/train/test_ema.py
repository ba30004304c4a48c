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
