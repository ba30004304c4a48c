"""Compile the attention-JVP kernels for NVIDIA GPUs on any machine (no GPU needed) and print each variant's
registers, spills and shared memory.

    PYTHONPATH=. python bench/kernel_resources.py [--targets 90,80] [--dtypes bf16,fp16,fp32] [--configs all|first]

The Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) runs the kernels' arithmetic but accepts
programs the GPU compiler rejects. Here Triton compiles them for real, ahead of time, for a GPU target
(capability 90 = H100/H200, 80 = A100): TTIR → TTGIR → LLVM IR → PTX → cubin with the ``ptxas`` that
ships in the Triton wheel, so a rejection shows up on a CPU machine. Each kernel is compiled in every
variant the launchers use (forward with and without tangent; pass Q and pass KV with both upstream
gradients, gO only and gT only; pass KV with ``FUSE_Q``, the one-pass backward; the δ kernel), for each
config of its autotuning space that the launcher's pruning keeps at ``--n-ctx``, with 16-byte aligned
pointers as the launchers pass them. Registers, spill bytes and shared memory come from ``ptxas -v`` with
Triton's own flags (``knobs.nvidia.dump_ptxas_log``): resource use, not speed (spilled registers cost
local-memory traffic; only a GPU timing says how much).

Runs without ``TRITON_INTERPRET`` (the kernels must be JIT functions); exits 1 if a variant fails to
compile. Written against Triton 3.7 (the development pin), whose ``ASTSource`` takes constexprs by name.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
from typing import Any, NamedTuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("bench/kernel_resources.py compiles for a GPU target: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention_jvp as km  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_ARGS = ("sb", "sh", "sn", "ob", "oh", "on", "H", "N_CTX")
STAT_ARGS = ("LSE2", "MU", "DELTA")  # row statistics: the accumulation dtype
GRADIENTS = ((True, True), (True, False), (False, True))  # (HAS_GO, HAS_GT): both, gO only, gT only
FLAG_SETS = {  # the variants each launcher compiles
    "fwd": [dict(HAS_TANGENT=t) for t in (True, False)],
    "bwd_q": [dict(HAS_GO=o, HAS_GT=t) for o, t in GRADIENTS],
    "bwd_kv": [dict(HAS_GO=o, HAS_GT=t, FUSE_Q=f) for f, (o, t) in itertools.product((False, True), GRADIENTS)],
    "delta": [dict(HAS_GO=o, HAS_GT=t) for o, t in GRADIENTS],
}
AUTOTUNERS = {
    "fwd": km._attention_jvp_fwd_kernel,
    "bwd_q": km._attention_jvp_bwd_q_kernel,
    "bwd_kv": km._attention_jvp_bwd_kv_kernel,
    "delta": km._attention_jvp_bwd_delta_kernel,
}


class Resources(NamedTuple):
    """What one compiled variant uses: registers per thread, spill bytes per thread, shared memory bytes."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared: int


def pointer_type(name: str, flags: dict[str, Any], dtype: torch.dtype) -> str:
    """Triton pointer type of argument ``name``: row statistics, and the one-pass gQ/gtQ sums, in fp32."""
    if name in STAT_ARGS or (flags.get("FUSE_Q") and name in ("GQ", "GTQ")):
        return "*fp32"
    return "*" + next(name for name, value in DTYPES.items() if value == dtype)


def compile_variant(
    kernel: str, flags: dict[str, Any], config: triton.Config, dtype: torch.dtype, head_dim: int, capability: int
) -> Resources:
    """Compile one variant for ``cuda:capability``; raises what Triton or ptxas raise."""
    fn = autotuner(kernel, flags).fn
    constexprs: dict[str, Any] = {**km._kernel_dtype_args(dtype, head_dim), **flags, **config.kwargs}
    constexprs["SCALE"] = km.default_scale(head_dim)
    names = [p.name for p in fn.params]
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    signature = {}
    attrs = {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in INT_ARGS:
            signature[param.name] = "i32"
        else:
            signature[param.name] = pointer_type(param.name, flags, dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]  # the launchers' pointers are 16-byte aligned
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas resource line in its log: {text[:500]!r}")
    return Resources(int(registers.group(1)), int(spills.group(1)), int(spills.group(2)), compiled.metadata.shared)


def autotuner(kernel: str, flags: dict[str, Any]) -> Any:
    """The autotuned kernel the launcher calls for this variant (pass KV with FUSE_Q has its own)."""
    return km._attention_jvp_bwd_kv_fused_q_kernel if flags.get("FUSE_Q") else AUTOTUNERS[kernel]


def kept_configs(kernel: str, flags: dict[str, Any], dtype: torch.dtype, n_ctx: int, head_dim: int) -> list:
    """The autotuning configs the launcher's pruning keeps for these inputs (the δ kernel: its one)."""
    configs = autotuner(kernel, flags).configs
    if kernel == "delta":
        return list(configs)
    d_pad = km._kernel_dtype_args(dtype, head_dim)["D_PAD"]
    return km._prune(configs, {"Q": torch.empty(0, dtype=dtype), "D_PAD": d_pad, "N_CTX": n_ctx})


def describe(config: triton.Config) -> str:
    """``BLOCK_M×BLOCK_N`` (the δ kernel: ``BLOCK_M`` rows), warps and pipeline stages."""
    tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N") if k in config.kwargs)
    return f"{tile} w{config.num_warps} s{config.num_stages}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="90", help="CUDA capabilities, comma-separated (90: H100/H200, 80: A100)")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"input dtypes, comma-separated: {', '.join(DTYPES)}")
    parser.add_argument("--kernels", default=",".join(AUTOTUNERS), help="kernels, comma-separated")
    parser.add_argument("--configs", choices=["all", "first"], default="all", help="every kept config, or the first")
    parser.add_argument("--n-ctx", type=int, default=256, help="sequence length the pruning sees (N ≤ 512: short)")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    unknown = set(args.dtypes.split(",")) - set(DTYPES) | set(args.kernels.split(",")) - set(AUTOTUNERS)
    if unknown:
        raise SystemExit(f"unknown dtype or kernel: {', '.join(sorted(unknown))}")

    print(f"# triton {triton.__version__}; N={args.n_ctx}, D={args.head_dim}; registers and spills by ptxas -v")
    print("| target | dtype | kernel | flags | config | registers | spill stores / loads (bytes) | shared (bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for capability, dtype_name, kernel in itertools.product(
        [int(t) for t in args.targets.split(",")], args.dtypes.split(","), args.kernels.split(",")
    ):
        for flags in FLAG_SETS[kernel]:
            configs = kept_configs(kernel, flags, DTYPES[dtype_name], args.n_ctx, args.head_dim)
            for config in configs[:1] if args.configs == "first" else configs:
                failed += compile_and_report(kernel, flags, config, dtype_name, args.head_dim, capability) is None
    print(f"# {failed} variant(s) failed to compile" if failed else "# every variant compiled")
    return 1 if failed else 0


def compile_and_report(
    kernel: str, flags: dict[str, Any], config: triton.Config, dtype_name: str, head_dim: int, capability: int
) -> Resources | None:
    """Print the table row of one variant; None when it failed to compile (the row says why)."""
    shown = " ".join(f"{k}={int(v)}" for k, v in flags.items())
    row = f"| sm_{capability} | {dtype_name} | {kernel} | {shown} | {describe(config)} |"
    try:
        r = compile_variant(kernel, flags, config, DTYPES[dtype_name], head_dim, capability)
    except Exception as exc:  # noqa: BLE001 - every failing variant is reported, then the exit code says it
        print(f"{row} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | |", flush=True)
        return None
    print(f"{row} {r.registers} | {r.spill_stores} / {r.spill_loads} | {r.shared} |", flush=True)
    return r


if __name__ == "__main__":
    sys.exit(main())
