"""FP8 linear layers for sampling (tvm/models/fp8.py, ``DiT.quantize_fp8``): the row-wise quantization
against its definition, the FP8 GEMM against a float64 product of the dequantized operands, the layer's
error against the exact linear map within the e4m3 rounding bound, the DiT's state dict and guards; on a
GPU (FP8 tensor cores, compute capability ≥ 8.9) the same GEMM and the quantized DiT, eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import one_hot, perturb_, tiny_dit
from tvm.compiling import compile_model
from tvm.models.fp8 import E4M3_MAX, Fp8Linear, check_fp8_device, rowwise_quantize

E4M3_EPS = 2.0**-3  # spacing of e4m3 values in [1, 2): 3 mantissa bits
needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 GEMMs need a GPU with FP8 tensor cores (compute capability ≥ 8.9)",
)


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.double() * scale.double()


def test_rowwise_quantize_maps_each_row_maximum_to_448_and_rounds_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-3, 3, 64)[:, None]  # rows over six decades
    q, scale = rowwise_quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(1, keepdim=True) / E4M3_MAX)
    assert torch.equal(q.float().abs().amax(1), torch.full((64,), E4M3_MAX))
    # round to nearest: within half a spacing of e4m3 (relative 2^-4) of x / s, in the normal range
    exact = x.double() / scale.double()
    normal = exact.abs() >= 2.0**-6
    error = (q.double() - exact).abs()
    assert (error[normal] <= exact.abs()[normal] * E4M3_EPS / 2 + 1e-12).all()
    assert (error[~normal] <= 2.0**-10).all()  # subnormal spacing 2^-9


def test_rowwise_quantize_of_a_zero_row_is_finite_zeros():
    q, scale = rowwise_quantize(torch.zeros(3, 16))
    assert torch.equal(q.float(), torch.zeros(3, 16)) and torch.isfinite(scale).all() and (scale > 0).all()


def test_rowwise_quantize_never_produces_nan():
    """e4m3fn has no infinity: a value above 448 after the division would cast to NaN without the clamp."""
    x = torch.tensor([[1.0, -3.0, 7.0], [448.0 * 3, 1e-30, -1e30]])
    q, _ = rowwise_quantize(x)
    assert not torch.isnan(q.float()).any()


def test_fp8_gemm_equals_the_float64_product_of_the_dequantized_operands():
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    x = torch.randn(4, 16, 96)
    layer = Fp8Linear.from_linear(linear)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (4, 16, 80) and y.dtype == torch.float32
    x_q, x_scale = rowwise_quantize(x.reshape(-1, 96))
    reference = dequantized(x_q, x_scale) @ dequantized(layer.weight_fp8, layer.weight_scale.T).T
    reference = reference + linear.bias.double()
    # the GEMM's fp32 accumulator is rounded to bf16 before the bias is added
    atol = 2**-8 * reference.abs().max().item()
    torch.testing.assert_close(y.reshape(-1, 80).double(), reference, rtol=2**-8, atol=atol)


def test_fp8_layer_is_within_the_e4m3_rounding_bound_of_the_exact_linear_map():
    """Each operand is rounded with relative error ≤ 2⁻⁴ per entry, so each output is off by at most
    ≈ 2·2⁻⁴ Σ_k |x_k W_nk| (plus bf16 rounding); in the mean the errors average out."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    x = torch.randn(512, 256)
    with torch.no_grad():
        exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        y = Fp8Linear.from_linear(linear)(x).double()
    bound = (2 * 2.0**-4 + 2.0**-8) * (x.double().abs() @ linear.weight.double().abs().T) + 2.0**-8 * exact.abs()
    assert ((y - exact).abs() <= bound).all()
    relative = ((y - exact).norm() / exact.norm()).item()
    assert 1e-3 < relative < 4e-2  # quantized (not the fp32 map), and close


def test_fp8_layer_shares_the_parameters_and_requantizes_on_load():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert set(layer.state_dict()) == {"weight", "bias"}  # the FP8 buffers are not saved
    other = nn.Linear(32, 48)
    layer.load_state_dict(other.state_dict())
    q, scale = rowwise_quantize(other.weight.detach())
    assert torch.equal(layer.weight_fp8.float(), q.float()) and torch.equal(layer.weight_scale, scale.reshape(1, -1))


def test_fp8_layer_refuses_gradient_mode():
    layer = Fp8Linear.from_linear(nn.Linear(16, 16))
    with pytest.raises(RuntimeError, match="sampling only"):
        layer(torch.randn(2, 16))


def test_under_bf16_autocast_the_output_is_bf16():
    layer = Fp8Linear.from_linear(nn.Linear(16, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, 16)).dtype == torch.bfloat16


def test_quantize_fp8_swaps_the_four_block_linears_and_keeps_the_state_dict():
    net = tiny_dit(depth=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert not net.fp8
    net.quantize_fp8()
    assert net.fp8
    for block in net.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(layer, Fp8Linear)
        assert not isinstance(block.adaLN_modulation[1], Fp8Linear)
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    net.quantize_fp8()  # idempotent
    assert all(type(block.mlp.fc1) is Fp8Linear for block in net.blocks)


def test_fp8_and_the_gelu_epilogue_exclude_each_other():
    net = tiny_dit(depth=2)
    net.fuse_gelu_epilogue()
    with pytest.raises(ValueError, match="cannot be combined with FP8"):
        net.quantize_fp8()
    net.fuse_gelu_epilogue(False)
    net.quantize_fp8()
    with pytest.raises(ValueError, match="cannot be combined with FP8"):
        net.fuse_gelu_epilogue()


@pytest.mark.parametrize("capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_gpus_without_fp8_tensor_cores_are_refused_by_name(monkeypatch, capability, refused):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    if refused:
        with pytest.raises(
            ValueError, match=r"compute capability 8\.9 .*A100-SXM4-80GB is " + rf"{capability[0]}\.{capability[1]}"
        ):
            check_fp8_device(torch.device("cuda"))
    else:
        check_fp8_device(torch.device("cuda"))
    check_fp8_device(torch.device("cpu"))


def dit_inputs(B: int, device: str) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(B, 2, 16, 16, device=device),
        torch.rand(B, device=device),
        torch.rand(B, device=device) * 0.5,
        one_hot(torch.arange(B) % 10, 10).float().to(device),
        torch.ones(B, device=device),
    )


def test_quantized_dit_stays_close_to_the_fp32_network_on_a_cpu():
    torch.manual_seed(0)
    net = perturb_(tiny_dit(input_size=16, hidden=128, heads=4, depth=3), scale=0.2)
    args = dit_inputs(8, "cpu")
    with torch.no_grad():
        fp32 = net(*args)
        net.quantize_fp8()
        quantized = net(*args)
    relative = ((quantized - fp32).norm() / fp32.norm()).item()
    assert 1e-3 < relative < 8e-2


def test_compiled_quantized_dit_traces_the_fp8_layers_on_a_cpu():
    """``torch.compile`` of the quantized DiT (what ``generate.py --fp8 --compile`` runs): Inductor's result
    equals the eager one's up to e4m3 roundings that flip (its division rounds differently)."""
    torch.manual_seed(0)
    net = perturb_(tiny_dit(input_size=16, hidden=128, heads=4, depth=3), scale=0.2)
    net.quantize_fp8()
    args = dit_inputs(8, "cpu")
    with torch.no_grad():
        eager = net(*args)
        compiled = compile_model(net)(*args)
    assert (compiled - eager).norm() / eager.norm() < 2e-2


@needs_fp8_gpu
def test_gpu_fp8_gemm_equals_the_float64_product_of_the_dequantized_operands():
    torch.manual_seed(0)
    linear = nn.Linear(1152, 4608).cuda()
    x = torch.randn(2, 256, 1152, device="cuda")
    layer = Fp8Linear.from_linear(linear)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    x_q, x_scale = rowwise_quantize(x.reshape(-1, 1152))
    reference = dequantized(x_q, x_scale) @ dequantized(layer.weight_fp8, layer.weight_scale.T).T
    reference = reference + linear.bias.double()
    error = (y.reshape(-1, 4608).double() - reference).abs()
    assert (error <= 2**-7 * reference.abs() + 2**-8 * reference.abs().max()).all()


@needs_fp8_gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_quantized_dit_stays_close_to_the_bf16_network(compiled):
    """As generation runs it (no gradients, bf16 autocast), eager and under ``torch.compile``: within the
    e4m3 rounding's reach of the fp32 network, and the compiled quantized network equals the eager one to
    bf16 rounding."""
    torch.manual_seed(0)
    net = perturb_(tiny_dit(input_size=16, hidden=128, heads=4, depth=3), scale=0.2).cuda()
    args = dit_inputs(8, "cuda")
    with torch.no_grad():
        fp32 = net(*args)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net(*args).float()
            net.quantize_fp8()
            eager = net(*args).float()
            quantized = (compile_model(net) if compiled else net)(*args).float()
    scale = fp32.norm()
    assert (bf16 - fp32).norm() / scale < 2e-2
    assert 2e-3 < (quantized - fp32).norm() / scale < 8e-2
    assert (quantized - eager).norm() / scale < 2e-2
