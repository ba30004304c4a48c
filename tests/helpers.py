"""Small shared builders for tests (importable as ``tests.helpers``... via sys.path below)."""
from __future__ import annotations

import torch

from tvm.models.dit import DiT
from tvm.method.wrapper import TVMWrapper


def tiny_dit(num_classes: int = 10, input_size: int = 8, in_channels: int = 2, depth: int = 2, hidden: int = 32,
             heads: int = 4, **kwargs) -> DiT:
    return DiT("DiT-S/2", input_size=input_size, in_channels=in_channels, num_classes=num_classes,
               hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every trainable parameter so that the zero-initialised layers become live."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def tiny_wrapper(do_scale_param: bool = True, perturb: bool = True, dtype: torch.dtype = torch.float64,
                 **kwargs) -> TVMWrapper:
    torch.manual_seed(0)
    model = tiny_dit(**kwargs)
    if perturb:
        perturb_(model)
    net = TVMWrapper(model, data_type="fp32", do_scale_param=do_scale_param, jvp_attn_backend="math")
    return net.to(dtype)


def one_hot(indices, num_classes: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(indices), num_classes).double()
