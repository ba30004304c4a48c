"""torch.compile over this package (tvm/compiling.py, DiT.compile_blocks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._functorch.config as functorch_config

from helpers import one_hot, tiny_wrapper
from tvm.compiling import (
    allow_tracing_this_package,
    compile_model,
    compile_training,
    set_activation_memory_budget,
    uses_cuda_graphs,
)
from tvm.config import compose_config
from tvm.method.times import Guidance, TimeSampling, draw_step


def loss_and_grads(net, teacher, call=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, 8, generator=gen)
    draws = draw_step(gen, 4, (2, 8, 8), TimeSampling(), Guidance(cfg=2.0), "cpu")
    loss = (net if call is None else call)(x, one_hot([0, 1, 2, 3]).float(), draws, teacher)["loss"]
    loss.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    net.zero_grad()
    return loss.detach(), grads


def test_package_is_taken_off_dynamos_skip_list():
    from torch._dynamo import trace_rules

    allow_tracing_this_package()
    import tvm.models.dit as dit

    assert not trace_rules.check_file(dit.__file__).skipped


def test_whole_loss_compiles_without_graph_breaks_and_equals_eager():
    net = tiny_wrapper(dtype=torch.float32)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    ref = loss_and_grads(net, teacher)
    compiled = compile_model(net, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    out = loss_and_grads(net, teacher, compiled)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_regional_compilation_reuses_one_graph_per_path_and_equals_eager():
    from torch._dynamo.utils import counters

    net = tiny_wrapper(dtype=torch.float32, depth=3)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    ref = loss_and_grads(net, teacher)
    for module in (net, teacher):
        module.model.compile_blocks(backend="aot_eager", fullgraph=True)
    counters.clear()
    out = loss_and_grads(net, teacher)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert 0 < counters["stats"]["unique_graphs"] <= 4  # tangent, plain, no-grad teacher; not per block
    assert "model.blocks.0.attn.qkv.weight" in net.state_dict()  # state dict keys unchanged


def test_memory_budget_recomputes_in_the_backward_without_changing_the_function():
    def saved_and_result(budget: float):
        torch._dynamo.reset()
        net = tiny_wrapper(dtype=torch.float32, depth=2)
        teacher = copy.deepcopy(net).eval().requires_grad_(False)
        net.model.compile_blocks(backend="aot_eager_decomp_partition")  # the partitioner Inductor uses
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        previous = functorch_config.activation_memory_budget
        try:
            set_activation_memory_budget(budget)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                result = loss_and_grads(net, teacher)
        finally:
            functorch_config.activation_memory_budget = previous
        return sum(saved.values()), result

    full, ref = saved_and_result(1.0)
    low, out = saved_and_result(0.3)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert low < 0.6 * full, (low, full)  # 0.39 here


def test_memory_budget_never_recomputes_the_attention_kernel():
    """At the configs' budget 0.7 the partitioner saves the Triton attention's outputs instead of running its forward
    again in the backward (it recomputes the cheap copies around it): the forward-backward graph pair of a compiled
    block calls the fused forward once, in the forward graph (docs/benchmarks.md, Rounds 11–13)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from helpers import perturb_, tiny_dit

    graphs: list[tuple[str, torch.fx.GraphModule]] = []

    def recorder(kind):
        def compiler(gm, inputs):
            graphs.append((kind, gm))
            return gm.forward

        return compiler

    backend = aot_autograd(
        fw_compiler=recorder("fw"), bw_compiler=recorder("bw"), partition_fn=min_cut_rematerialization_partition
    )
    torch._dynamo.reset()
    torch.manual_seed(1)
    block = perturb_(tiny_dit(hidden=64, heads=4)).blocks[0]
    allow_tracing_this_package()
    gen = torch.Generator().manual_seed(0)
    x, dx = (torch.randn(2, 16, 64, generator=gen) for _ in range(2))
    c, dc = (torch.randn(2, 64, generator=gen) for _ in range(2))
    previous = functorch_config.activation_memory_budget
    try:
        set_activation_memory_budget(0.7)
        y, dy = torch.compile(block, backend=backend)(x.requires_grad_(), c, "triton", dx, dc)
        (y.square().sum() + dy.square().sum()).backward()
    finally:
        functorch_config.activation_memory_budget = previous
        torch._dynamo.reset()

    def calls(gm: torch.fx.GraphModule) -> int:
        return sum(n.op == "call_function" and "attention_jvp_fwd" in str(n.target) for n in gm.graph.nodes)

    assert sorted((kind, calls(gm)) for kind, gm in graphs) == [("bw", 0), ("fw", 1)]


def test_memory_budget_outside_zero_one_is_refused():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="compile_memory_budget must be in"):
            set_activation_memory_budget(bad)


@pytest.mark.parametrize(
    "mode, training_options, ema_options",
    [
        ("default", {}, {}),
        ("reduce-overhead", {"mode": "reduce-overhead"}, {}),
        ("max-autotune", {"mode": "max-autotune"}, {"mode": "max-autotune-no-cudagraphs"}),
        ("max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"}, {"mode": "max-autotune-no-cudagraphs"}),
    ],
)
def test_training_modes_compile_the_eval_ema_without_cuda_graphs(mode, training_options, ema_options):
    """The online net and the teacher get the configured mode; the eval EMA (sampling loops feed a
    block's output back in, which CUDA graph replays overwrite) gets the same without CUDA graphs."""
    network = compose_config("tiny", ["network.compile=true", f"network.compile_mode={mode}"]).network
    calls = {}

    class Model:
        def __init__(self, name):
            self.name = name

        def compile_blocks(self, **options):
            calls[self.name] = options

    class Wrapper:
        def __init__(self, name):
            self.model = Model(name)

    ddp = object()
    try:
        assert compile_training(ddp, Wrapper("online"), Wrapper("teacher"), Wrapper("ema"), network) is ddp
    finally:
        set_activation_memory_budget(1.0)
        torch._dynamo.config.automatic_dynamic_shapes = True
    assert calls == {"online": training_options, "teacher": training_options, "ema": ema_options}
    assert uses_cuda_graphs(mode) == (mode in ("reduce-overhead", "max-autotune"))


_FRESH_PROCESS_LOAD = """
import sys, torch
from tvm.compiling import compile_model, load_compile_cache
loaded = load_compile_cache(sys.argv[1])
f = compile_model(lambda x: torch.sin(x) * 2 + x.cos())
assert torch.allclose(f(torch.arange(8.0)), torch.sin(torch.arange(8.0)) * 2 + torch.arange(8.0).cos())
from torch._dynamo.utils import counters
print("RESULT", loaded, counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_compile_cache_round_trip_in_a_fresh_process(tmp_path):
    """The artifacts saved after compiling are loaded by a new process with an empty Inductor cache
    (a job requeued on another node), which then compiles the same function from the cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-a"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    cache = tmp_path / "compile-cache.bin"
    writer = (
        "import sys, torch\nfrom tvm.compiling import compile_model, save_compile_cache\n"
        "f = compile_model(lambda x: torch.sin(x) * 2 + x.cos())\nf(torch.arange(8.0))\n"
        "print('RESULT', save_compile_cache(sys.argv[1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", writer, str(cache)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    written = int(out.stdout.split("RESULT")[1].split()[0])
    assert written >= 1 and cache.stat().st_size > 0
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-b")  # another node: nothing cached locally
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_LOAD, str(cache)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, hits, misses = (int(v) for v in out.stdout.split("RESULT")[1].split())
    assert loaded == written and hits >= 1 and misses == 0


def test_a_damaged_compile_cache_is_ignored_with_a_warning(tmp_path):
    from tvm.compiling import load_compile_cache

    assert load_compile_cache(tmp_path / "absent.bin") == 0
    damaged = tmp_path / "compile-cache.bin"
    damaged.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="ignoring the compile cache"):
        assert load_compile_cache(damaged) == 0
