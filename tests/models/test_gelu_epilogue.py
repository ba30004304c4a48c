"""``fc1`` + GELU as one GEMM with the GELU in its epilogue (``Mlp.gelu_epilogue``,
``DiT.fuse_gelu_epilogue``, ``linear_gelu_tanh`` in tvm/models/dit.py): on any machine, the paths that
must stay unfused; on a GPU, the fused GEMM against float64 references, bf16 accuracy, and the whole
DiT fused and compiled against the unfused network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import one_hot, perturb_, tiny_dit
from tvm.compiling import compile_model
from tvm.models.dit import Mlp, linear_gelu_tanh

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GELU epilogue is a cuBLASLt (GPU) path")


def mlp_reference(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 (tanh GELU, no dropout)."""
    w1, b1, w2, b2 = (p.detach().double().cpu() for p in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
    return F.linear(F.gelu(F.linear(x.double().cpu(), w1, b1), approximate="tanh"), w2, b2)


def test_the_flag_changes_nothing_on_a_cpu():
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64), torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = mlp(x)
        mlp.gelu_epilogue = True
        assert torch.equal(mlp(x), plain)


def test_fuse_gelu_epilogue_sets_every_block_and_unsets_them():
    net = tiny_dit(depth=3)
    assert not any(block.mlp.gelu_epilogue for block in net.blocks)
    net.fuse_gelu_epilogue()
    assert all(block.mlp.gelu_epilogue for block in net.blocks)
    net.fuse_gelu_epilogue(False)
    assert not any(block.mlp.gelu_epilogue for block in net.blocks)


@needs_cuda
def test_with_gradients_the_flagged_mlp_stays_unfused_and_differentiable():
    torch.manual_seed(0)
    mlp = Mlp(64, 256).cuda()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = mlp(x)
        mlp.gelu_epilogue = True
        flagged = mlp(x)
    assert torch.equal(flagged, plain)
    flagged.float().sum().backward()  # the fused op has no derivative: this would raise
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_cuda
def test_fp32_epilogue_is_the_tanh_gelu_of_the_linear_map(monkeypatch):
    """In fp32 (TF32 off) the fused GEMM matches the float64 tanh form to float32 rounding and is told
    apart from the erf form, which differs by up to ≈ 5e-4 around |x| ≈ 2."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    x = torch.randn(512, 64, device="cuda")
    weight, bias = torch.randn(256, 64, device="cuda") / 8, torch.linspace(-3, 3, 256, device="cuda")
    fused = linear_gelu_tanh(x, weight, bias).double().cpu()
    pre = F.linear(x.double().cpu(), weight.double().cpu(), bias.double().cpu())
    assert (fused - F.gelu(pre, approximate="tanh")).abs().max() < 1e-5
    assert (fused - F.gelu(pre)).abs().max() > 1e-4


@needs_cuda
def test_bf16_fused_mlp_is_as_accurate_as_the_unfused_one():
    """Under bf16 autocast the fused MLP's error against float64 is no larger than the unfused one's
    (it rounds the pre-activation once instead of twice), and both are bf16-small."""
    torch.manual_seed(0)
    mlp = Mlp(256, 1024).cuda()
    x = torch.randn(8, 64, 256, device="cuda")
    reference = mlp_reference(mlp, x)
    errors = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for fused in (False, True):
            mlp.gelu_epilogue = fused
            out = mlp(x)
            assert out.dtype == torch.bfloat16 and out.shape == x.shape
            errors[fused] = ((out.double().cpu() - reference).norm() / reference.norm()).item()
    assert errors[True] < 8e-3 and errors[False] < 8e-3
    assert errors[True] <= errors[False] * 1.05


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_dit_equals_the_unfused_dit_to_bf16_rounding(compiled):
    """The whole network sampled as generation runs it (no gradients, bf16 autocast), eager and under
    ``torch.compile`` (where the fused GEMM is an extern kernel call): within bf16 rounding of the
    unfused network, and both within bf16 rounding of the fp32 network."""
    torch.manual_seed(0)
    net = perturb_(tiny_dit(input_size=16, hidden=128, heads=4, depth=3), scale=0.2).cuda()
    B = 8
    args = (
        torch.randn(B, 2, 16, 16, device="cuda"),
        torch.rand(B, device="cuda"),
        torch.rand(B, device="cuda") * 0.5,
        one_hot(torch.arange(B) % 10, 10).float().cuda(),
        torch.ones(B, device="cuda"),
    )
    with torch.no_grad():
        fp32 = net(*args)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plain = net(*args).float()
            net.fuse_gelu_epilogue()
            model = compile_model(net) if compiled else net
            fused = model(*args).float()
    scale = fp32.norm()
    assert not torch.equal(fused, plain)  # the fused path ran: it rounds differently
    assert (fused - plain).norm() / scale < 2e-2
    assert (fused - fp32).norm() / scale < 2e-2 and (plain - fp32).norm() / scale < 2e-2
