"""Initialisation of the TVM DiT (docs/method.md §3.8), one function per rule.

Upstream order of operations, reproduced so that the random-number consumption matches:

1. module construction (each module's default init; done by the constructors);
2. every ``nn.Linear`` in module order: ``init_type`` rule on the weight, bias ← 0; QK-norm
   weights ← 1;
3. ``pos_embed`` ← 2-D sin-cos;
4. patch-embed weight viewed as ``[D, C·p·p]`` ← xavier-normal (upstream keeps it unnormalised:
   its division by σ_max is lost to an alias; ``patch_spectral=True`` applies it);
5. label table ← N(0, 0.02²);
6. timestep embedders (t, guidance, gap in that order) ← N(0, 0.02²), or spectral when
   ``time_specinit``;
7. zero: every adaLN output layer and the final linear.

Layers that step 6 or 7 overwrite still draw their step-2 xavier values (to keep the RNG
stream), but skip the SVD, which consumes no random numbers and is the slow part on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from tvm.models.dit import DiT, DiTBlock, TimestepEmbedder

INIT_TYPES = ("spectral", "xunif")
EMBED_STD = 0.02


@torch.no_grad()
def spectral_normal_(weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Xavier-normal (gain 1, std = √(2/(fan_in + fan_out))), then ``W ← W / σ_max(W)``.

    With ``normalize=False`` only the xavier draw is made (same RNG consumption).
    Args:
        weight: ``[out, in]`` (a 2-D view of the parameter).
    """
    nn.init.xavier_normal_(weight)
    if normalize:
        sigma = torch.linalg.matrix_norm(weight.float(), ord=2)
        weight.div_(sigma.to(weight.dtype))
    return weight


@torch.no_grad()
def init_linear_(layer: nn.Linear, init_type: str, normalize: bool = True) -> None:
    """Step 2 for one linear layer: ``spectral`` or ``xunif`` weight, zero bias."""
    if init_type == "spectral":
        spectral_normal_(layer.weight, normalize=normalize)
    elif init_type == "xunif":
        nn.init.xavier_uniform_(layer.weight)
    else:
        raise ValueError(f"unknown init_type {init_type!r}; allowed: {', '.join(INIT_TYPES)}")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Sequential`` item built as ``nn.Linear`` (the container types its items as Module)."""
    assert isinstance(module, nn.Linear), type(module)
    return module


@torch.no_grad()
def init_timestep_embedder_(embedder: TimestepEmbedder, spectral: bool) -> None:
    """Step 6: both MLP linears ← N(0, 0.02²), then (if ``spectral``) spectral-normal instead."""
    for layer in (_linear(embedder.mlp[0]), _linear(embedder.mlp[2])):
        nn.init.normal_(layer.weight, std=EMBED_STD)
    if spectral:
        for layer in (_linear(embedder.mlp[0]), _linear(embedder.mlp[2])):
            spectral_normal_(layer.weight)


@torch.no_grad()
def zero_(layer: nn.Linear) -> None:
    """Step 7: weight and bias ← 0."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


@torch.no_grad()
def initialize_dit(
    model: DiT, init_type: str = "spectral", time_specinit: bool = False, patch_spectral: bool = False
) -> None:
    """Run steps 2–7 on a freshly constructed :class:`~tvm.models.dit.DiT` (docs/method.md §3.8)."""
    from tvm.models.dit import sincos_pos_embed_2d

    if model.pos_embed.device.type == "meta":
        return
    embedders = [model.t_embedder, model.s_embedder] + ([model.guidance_embedder] if model.learn_guidance else [])
    blocks = cast("Iterable[DiTBlock]", model.blocks)  # an nn.ModuleList types its items as Module
    zeroed = [_linear(b.adaLN_modulation[1]) for b in blocks]
    zeroed += [_linear(model.final_layer.adaLN_modulation[1]), model.final_layer.linear]
    overwritten = {id(m) for m in zeroed} | {id(e.mlp[i]) for e in embedders for i in (0, 2)}

    for module in model.modules():  # step 2
        if isinstance(module, nn.Linear):
            init_linear_(module, init_type, normalize=id(module) not in overwritten)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)

    grid = model.input_size // model.patch_size  # step 3
    pos = sincos_pos_embed_2d(model.hidden_size, grid)
    model.pos_embed.copy_(torch.from_numpy(pos).float()[None])

    conv = model.x_embedder.proj  # step 4
    spectral_normal_(conv.weight.view(conv.weight.shape[0], -1), normalize=patch_spectral)
    assert conv.bias is not None  # PatchEmbed builds it with a bias
    nn.init.zeros_(conv.bias)

    nn.init.normal_(model.y_embedder.embedding_table.weight, std=EMBED_STD)  # step 5

    specinit = time_specinit and init_type == "spectral"  # step 6, upstream order: t, guidance, gap
    for embedder in (
        [model.t_embedder] + ([model.guidance_embedder] if model.learn_guidance else []) + [model.s_embedder]
    ):
        init_timestep_embedder_(embedder, spectral=specinit)

    for layer in zeroed:  # step 7
        zero_(layer)
