"""The fused EMA kernel (kernels/ema.py): upstream's lerp for one or two EMAs in one pass.

On the CPU the kernel runs under the Triton interpreter, whose fused multiply-add rounds twice (a product,
then a sum), so its values are compared with float64 to within two fp32 roundings; on a GPU the kernel's
fused multiply-adds round once, as PyTorch's CUDA lerp does, and the values are compared bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import ema as kernel
from kernels.launch_plans import is_interpreting

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cpu" if is_interpreting() else "cuda"  # the compiled kernel takes GPU tensors only
SIZES = (4, 8, 68, 1000, 2 * 4 * 64 + 4)  # one vector to several rounds of the programs' loop (interpreter sizes)


def random_tensors(sizes, device, seed):
    gen = torch.Generator().manual_seed(seed)
    net = [torch.randn(n, generator=gen) for n in sizes]
    emas = [[x + torch.randn(x.shape, generator=gen) * scale for x in net] for scale in (1e-2, 3.0)]
    return [x.to(device) for x in net], [[x.to(device) for x in ema] for ema in emas]


def lerp_float64(net: torch.Tensor, ema: torch.Tensor, beta: float) -> torch.Tensor:
    """``lerp(net, ema, β)`` in float64 with β and 1 − β rounded to fp32 as the kernel takes them."""
    beta32 = torch.tensor(beta, dtype=torch.float32)
    net, ema, b, c = net.double(), ema.double(), beta32.double(), (1 - beta32).double()
    return net + b * (ema - net) if beta < 0.5 else ema - (ema - net) * c


@pytest.mark.parametrize("betas", [(0.9999, 0.99), (0.3, 0.9), (0.999,)], ids=str)
def test_kernel_is_lerp_for_one_or_two_emas(betas):
    net, emas = random_tensors(SIZES, DEVICE, seed=len(betas))
    emas = emas[: len(betas)]
    before = [[x.clone() for x in ema] for ema in emas]
    assert kernel.update_emas_(net, emas, torch.tensor(betas, dtype=torch.float32, device=DEVICE)) == ()
    for ema, old, beta in zip(emas, before, betas):
        for got, previous, n in zip(ema, old, net):
            want = lerp_float64(n, previous, beta)
            ulp = torch.finfo(torch.float32).eps * (want.abs() + (previous - n).abs() * min(beta, 1 - beta))
            assert ((got.double() - want).abs() <= 2 * ulp).all(), (beta, got.numel())
            assert ((got.double() - torch.lerp(n, previous, beta).double()).abs() <= 3 * ulp).all(), (beta, got.numel())


def test_beta_one_leaves_the_emas_unchanged_and_the_plan_is_reused():
    net, emas = random_tensors(SIZES, DEVICE, seed=3)
    before = [[x.clone() for x in ema] for ema in emas]
    kernel._PLANS.clear()
    assert kernel.update_emas_(net, emas, torch.ones(2, device=DEVICE)) == ()
    assert all(torch.equal(a, b) for ema, old in zip(emas, before) for a, b in zip(ema, old))
    kernel.update_emas_(net, emas, torch.tensor([0.9, 0.9], device=DEVICE))
    assert len(kernel._PLANS) == 1
    moved = [x.clone() for x in net]  # new addresses: a new plan
    kernel.update_emas_(moved, emas, torch.tensor([0.9, 0.9], device=DEVICE))
    assert len(kernel._PLANS) == 2


def test_parameters_the_kernel_does_not_take_are_left_to_the_caller():
    net, (first, second) = random_tensors((8, 16, 12, 20, 24), DEVICE, seed=4)
    assert all(kernel.takes(*group) for group in zip(net, first, second))
    first[1] = torch.zeros(32, device=DEVICE)[::2]  # not contiguous
    second[2] = torch.zeros(13, device=DEVICE)[1:]  # 4 bytes past an aligned address
    net[3] = net[3].double()
    odd = [torch.zeros(7, device=DEVICE) for _ in range(3)]  # 7 elements: not divisible by 4
    assert not kernel.takes(*odd) and not kernel.takes(torch.zeros(8, device=DEVICE), torch.zeros(2, 4, device=DEVICE))
    before = [[x.clone() for x in ema] for ema in (first, second)]
    assert kernel.update_emas_(net, [first, second], torch.tensor([0.5, 0.5], device=DEVICE)) == (1, 2, 3)
    for i in range(5):
        changed = [not torch.equal(ema[i], old[i]) for ema, old in zip((first, second), before)]
        assert changed == [i in (0, 4)] * 2, i
    with pytest.raises(ValueError, match="one or two EMAs with 5 tensors each"):
        kernel.update_emas_(net, [first[:4]], torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match=r"betas must be fp32 \[2\]"):
        kernel.update_emas_(net, [first, second], torch.ones(1, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's fused multiply-add: bits on a GPU only")
def test_kernel_has_torch_lerps_bits_on_the_gpu():
    net, emas = random_tensors((4, 1000, 2048 * 64 + 4, 3 * 2048 * 64), "cuda", seed=5)
    for betas in ((0.9999, 0.99), (0.3, 0.5), (1.0, 0.0)):
        expected = [[torch.lerp(n, e, beta) for n, e in zip(net, ema)] for ema, beta in zip(emas, betas)]
        kernel.update_emas_(net, emas, torch.tensor(betas, device="cuda"))
        for ema, want in zip(emas, expected):
            assert all(torch.equal(a, b) for a, b in zip(ema, want)), betas


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import ema
for capability in (90, 80):
    for second in (True, False):
        source = ASTSource(ema._ema_update_kernel, {"TABLE": "*i64", "BETAS": "*fp32", "HAS_SECOND": "constexpr",
            "BLOCK": "constexpr"}, constexprs={"HAS_SECOND": second, "BLOCK": ema.BLOCK})
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
        ptx = compiled.asm["ptx"]
        print(capability, second, "ld.global.v4." in ptx and "st.global.v4." in ptx)
"""


@pytest.mark.slow
def test_kernel_compiles_for_hopper_and_ampere_with_vector_loads():
    """The GPU compiler takes the kernel (the interpreter accepts more), and the alignment hints give
    16-byte loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "90",
        "True",
        "True",
        "90",
        "False",
        "True",
        "80",
        "True",
        "True",
        "80",
        "False",
        "True",
    ]
