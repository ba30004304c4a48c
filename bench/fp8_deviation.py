"""How far FP8 sampling moves a small DiT's output (CPU; the figures quoted in README.md and docs/benchmarks.md,
Round 16):

    PYTHONPATH=. python bench/fp8_deviation.py

The DiT of tests/models/test_fp8.py (DiT-S/2 layout, hidden 128, 3 blocks, 4 heads, 16×16×2 latents, every
parameter perturbed by 0.2·N(0, 1) so that the zero-initialised layers are live), batch 8, no gradients. Prints
‖y − y_fp32‖ / ‖y_fp32‖ for bf16 autocast, FP8 (``DiT.quantize_fp8``) in fp32 and under bf16 autocast, and the
compiled FP8 network against the eager one.
"""

from __future__ import annotations

import torch

from tvm.compiling import compile_model
from tvm.models.dit import DiT


def small_dit() -> DiT:
    torch.manual_seed(0)
    net = DiT("DiT-S/2", input_size=16, in_channels=2, num_classes=10, hidden_size=128, depth=3, num_heads=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return net


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def main() -> None:
    net = small_dit()
    B = 8
    args = (
        torch.randn(B, 2, 16, 16),
        torch.rand(B),
        torch.rand(B) * 0.5,
        torch.nn.functional.one_hot(torch.arange(B) % 10, 10).float(),
        torch.ones(B),
    )
    fp32 = net(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = net(*args)
    net.quantize_fp8()
    fp8 = net(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp8_bf16 = net(*args)
    compiled = compile_model(net)(*args)
    print("| network | relative difference | to |")
    print("|---|---|---|")
    print(f"| bf16 autocast | {relative(bf16, fp32):.2e} | fp32 |")
    print(f"| FP8 | {relative(fp8, fp32):.2e} | fp32 |")
    print(f"| FP8, bf16 autocast | {relative(fp8_bf16, fp32):.2e} | fp32 |")
    print(f"| FP8 compiled | {relative(compiled, fp8):.2e} | FP8 eager |")
    print(f"# torch {torch.__version__}")


if __name__ == "__main__":
    main()
