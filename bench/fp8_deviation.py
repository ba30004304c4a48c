"""How far FP8 GEMMs move a small DiT's output, and in training its tangent and gradients (CPU; the figures quoted
in README.md and docs/benchmarks.md, Rounds 16 and 17):

    PYTHONPATH=. python bench/fp8_deviation.py

The DiT of tests/models/test_fp8.py (DiT-S/2 layout, hidden 128, 3 blocks, 4 heads, 16×16×2 latents, every
parameter perturbed by 0.2·N(0, 1) so that the zero-initialised layers are live), batch 8, no gradients. Prints
‖y − y_fp32‖ / ‖y_fp32‖ for bf16 autocast, FP8 (``DiT.quantize_fp8``) in fp32 and under bf16 autocast, and the
compiled FP8 network against the eager one. Then, as the training step uses the network (``network.fp8``,
``DiT.quantize_fp8(static_weight=False)``): the explicit-tangent forward's value and tangent along the gap, and the
parameters' gradients of ``Σ F² + Σ Ḟ² + Σ F_plain²``, for bf16 autocast and FP8 against fp32 (the gradients as
the median and the largest of the per-tensor relative differences).
"""

from __future__ import annotations

import torch

from tvm.compiling import compile_model
from tvm.models.dit import DiT, FlowMapInput


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


def inputs(B: int) -> FlowMapInput:
    return FlowMapInput(
        torch.randn(B, 2, 16, 16),
        torch.rand(B),
        torch.rand(B) * 0.5,
        torch.nn.functional.one_hot(torch.arange(B) % 10, 10).float(),
        torch.ones(B),
    )


def training_outputs(mode: str, args: FlowMapInput) -> list[torch.Tensor]:
    """Value, tangent (along the gap, ``ġap = −1``) and the parameters' gradients of the small DiT in ``mode``:
    fp32, bf16 (autocast) or fp8 (the training layers)."""
    net = small_dit()
    if mode == "fp8":
        net.quantize_fp8(static_weight=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        out, dout = net.forward_with_tangent(args, -torch.ones_like(args.gap), attn_backend="math")
        (out.square().sum() + dout.square().sum() + net(*args, attn_backend="math").square().sum()).backward()
    return [out.detach(), dout.detach(), *(p.grad for p in net.parameters() if p.grad is not None)]


def print_training_deviations() -> None:
    torch.manual_seed(1)
    args = inputs(8)
    fp32 = training_outputs("fp32", args)
    print("| training network | value | tangent | gradients, median | gradients, largest | to |")
    print("|---|---|---|---|---|---|")
    for mode in ("bf16", "fp8"):
        value, tangent, *grads = (relative(a, b) for a, b in zip(training_outputs(mode, args), fp32))
        grads.sort()
        name = {"bf16": "bf16 autocast", "fp8": "FP8 (network.fp8)"}[mode]
        print(f"| {name} | {value:.2e} | {tangent:.2e} | {grads[len(grads) // 2]:.2e} | {grads[-1]:.2e} | fp32 |")


@torch.no_grad()
def print_sampling_deviations() -> None:
    net = small_dit()
    args = inputs(8)
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


def main() -> None:
    print_sampling_deviations()
    print_training_deviations()
    print(f"# torch {torch.__version__}")


if __name__ == "__main__":
    main()
