"""bench/step.py's command line: variants, what it checks, and refusals before any GPU work (the rows
themselves need a GPU: docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch


def test_step_benchmark_parses_the_launch_plan_ab(monkeypatch):
    """bench/step.py --ab-fast-launch: the default variant is the configs' training step; a bad
    variant fails before any GPU work (the A/B itself needs a GPU)."""
    from bench.step import AB_DEFAULT_VARIANT, Variant, main

    configs_step = Variant("explicit", "triton", "blocks", "none", 0.7, split=True, fm_budget=1.0)
    assert Variant.parse(AB_DEFAULT_VARIANT) == configs_step
    monkeypatch.setattr("sys.argv", ["step.py", "--ab-fast-launch", "explicit"])
    with pytest.raises(SystemExit, match="bad variant 'explicit'"):
        main()


def test_step_benchmark_variants_and_checks(monkeypatch):
    """bench/step.py: ``--check`` lists the variants to check (default: the timed ones), also ones
    not timed; the ``estimator`` option; bad variants anywhere fail before any GPU work."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from bench.step import COMPILE_CACHES, Variant, checked_variants, main, set_recompute_estimator

    assert checked_variants(None, ["a", "b", "a"]) == ["a", "b"]
    assert checked_variants("", ["a"]) == []
    assert checked_variants("c,a", ["a"]) == ["c", "a"]  # before 2026-12-06 only timed ones: ["a"]
    assert Variant.parse("explicit:triton:blocks:budget=0.7:estimator=profile").estimator == "profile"
    assert Variant.parse("explicit:triton:blocks").estimator == "flops"
    try:
        set_recompute_estimator("profile")
        assert functorch_config.activation_memory_budget_runtime_estimator == "profile"
        assert not functorch_config.enable_autograd_cache and not inductor_config.fx_graph_cache
    finally:
        set_recompute_estimator("flops")
    assert functorch_config.activation_memory_budget_runtime_estimator == "flops"
    assert (functorch_config.enable_autograd_cache, inductor_config.fx_graph_cache) == COMPILE_CACHES
    for argv in (["--check", "explicit:triton:estimator=time"], ["--variants", "explicit:triton:what=1"]):
        monkeypatch.setattr("sys.argv", ["step.py", *argv])
        with pytest.raises(SystemExit, match="bad variant"):
            main()


def test_step_benchmark_split_and_rounds_options(monkeypatch):
    """bench/step.py's ``split``, ``fm_budget`` and ``rounds`` options (training.split_backward,
    network.compile_memory_budget_fm, accumulation rounds), refused before any GPU work when malformed."""
    from bench.step import Variant, main

    plan = Variant.parse("explicit:triton:blocks:budget=0.7:split=1:fm_budget=1.0:rounds=2")
    assert (plan.split, plan.fm_budget, plan.rounds, plan.budget) == (True, 1.0, 2, 0.7)
    assert Variant.parse("explicit:triton:blocks") == Variant("explicit", "triton", "blocks")
    assert (Variant.parse("explicit:triton").split, Variant.parse("explicit:triton").rounds) == (False, 1)
    assert Variant.parse("explicit:triton:blocks:graph=1").graph and not plan.graph
    assert Variant.parse("explicit:triton:blocks:cdt=1").tuned and not plan.tuned
    assert Variant.parse("explicit:triton:blocks:pdl=1").pdl and not plan.pdl
    assert Variant.parse("explicit:triton:blocks:bwd=one-pass").one_pass and not plan.one_pass
    assert not Variant.parse("explicit:triton:blocks:bwd=two-pass").one_pass
    assert plan.contiguous_operands is plan.contiguous_outputs is plan.fused_ema is None  # as the process runs
    assert Variant.parse("explicit:triton:operands=views").contiguous_operands is False
    assert Variant.parse("explicit:triton:operands=contiguous").contiguous_operands is True
    assert Variant.parse("explicit:triton:outputs=contiguous").contiguous_outputs is True
    assert Variant.parse("explicit:triton:ema=per-tensor").fused_ema is False
    assert Variant.parse("explicit:triton:blocks:fp8=1").fp8 and not plan.fp8
    bad_options = ("split=2", "fm_budget=1.0", "rounds=0", "rounds=two", "graph=yes", "cdt=yes", "bwd=1", "operands=1")
    for bad in (*bad_options, "outputs=views", "ema=1", "pdl=yes", "fp8=true"):
        monkeypatch.setattr("sys.argv", ["step.py", "--variants", f"explicit:triton:blocks:{bad}"])
        with pytest.raises(SystemExit, match="bad variant"):
            main()
    monkeypatch.setattr("sys.argv", ["step.py", "--batch", "32", "--variants", "explicit:triton:blocks:rounds=3"])
    with pytest.raises(SystemExit, match="rounds do not divide the batch 32"):
        main()
    for argv in (["--warmup", "2", "--variants", "explicit:triton:graph=1"], ["--profile", "explicit:triton:graph=1"]):
        monkeypatch.setattr("sys.argv", ["step.py", *argv])
        with pytest.raises(SystemExit, match="graph=1 times --variants rows only"):
            main()


def test_step_benchmark_inductor_switches_keep_the_modes_options():
    """``cdt=1`` / ``+cdt`` and ``pdl=1`` / ``+pdl``: the torch.compile mode's own Inductor options plus
    coordinate-descent tuning or programmatic dependent launch."""
    from bench.step import compile_kwargs, inductor_options

    assert compile_kwargs("default", {}) == {}
    assert compile_kwargs("max-autotune-no-cudagraphs", {}) == {"mode": "max-autotune-no-cudagraphs"}
    tuned = inductor_options("cdt")
    assert compile_kwargs("default", tuned) == {"options": {"coordinate_descent_tuning": True}}
    assert compile_kwargs("reduce-overhead", tuned)["options"] == {
        "triton.cudagraphs": True,
        "coordinate_descent_tuning": True,
    }
    assert compile_kwargs("max-autotune-no-cudagraphs", tuned)["options"]["max_autotune"] is True
    both = compile_kwargs("default", inductor_options("cdt", "pdl"))["options"]
    assert both == {"coordinate_descent_tuning": True, "triton.enable_pdl": True}
    assert set(both) <= set(torch._inductor.config.get_config_copy())  # names Inductor knows


def test_step_benchmark_sets_the_modules_per_variant(monkeypatch):
    """``bwd``, ``operands``, ``outputs`` and ``ema`` hold for that variant's steps only; a variant without them
    leaves the process's settings (``TVM_ATTENTION_BACKWARD``, the modules' defaults) as they are."""
    from bench.step import Variant, step_settings
    from kernels import attention_jvp
    from tvm.models import attention
    from tvm.train import ema

    monkeypatch.setattr(attention_jvp, "ONE_PASS_BACKWARD", False)
    defaults = (attention.CONTIGUOUS_KERNEL_OPERANDS, attention_jvp.TOKEN_MAJOR_OUTPUTS, ema.FUSED_EMA_DEVICES)
    assert defaults == (True, True, ("cuda",))
    every = "explicit:triton:bwd=one-pass:operands=views:outputs=contiguous:ema=per-tensor"
    with step_settings(Variant.parse(every)):
        assert attention_jvp.ONE_PASS_BACKWARD and not attention.CONTIGUOUS_KERNEL_OPERANDS
        assert not attention_jvp.TOKEN_MAJOR_OUTPUTS and ema.FUSED_EMA_DEVICES == ()
    assert not attention_jvp.ONE_PASS_BACKWARD
    assert (attention.CONTIGUOUS_KERNEL_OPERANDS, attention_jvp.TOKEN_MAJOR_OUTPUTS, ema.FUSED_EMA_DEVICES) == defaults
    monkeypatch.setattr(attention_jvp, "ONE_PASS_BACKWARD", True)
    with step_settings(Variant.parse("explicit:triton")):
        assert attention_jvp.ONE_PASS_BACKWARD and attention.CONTIGUOUS_KERNEL_OPERANDS


def test_step_benchmark_names_the_ops_behind_eager_kernels():
    """The profile's attribution of ATen kernels to the host ops that launched them (by ``External id``),
    per call, filtered by category, largest first."""
    from bench.step import launching_ops

    def op(eid, name, dims):
        return {
            "cat": "cpu_op",
            "name": name,
            "args": {"External id": eid, "Input Dims": dims, "Input type": ["float"]},
        }

    def kernel(eid, name, dur):
        return {"cat": "kernel", "name": name, "dur": dur, "args": {"External id": eid}}

    copy = "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>"
    events = [
        op(1, "aten::copy_", [[4, 4], [4, 4]]),
        op(2, "aten::copy_", [[8], [8]]),
        op(3, "aten::mm", [[4, 4], [4, 4]]),
        kernel(1, copy, 3000.0),
        kernel(1, copy, 3000.0),
        kernel(2, copy, 1000.0),
        kernel(3, "nvjet_sm90_tst_192x192", 9000.0),  # a GEMM: not asked for
        kernel(4, "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", 500.0),  # no op
    ]
    rows = launching_ops(events, 2, ("elementwise / normalisation (ATen)",))
    assert rows == [
        (3.0, 1.0, "aten::copy_", "[[4, 4], [4, 4]]", "['float']"),
        (0.5, 0.5, "aten::copy_", "[[8], [8]]", "['float']"),
        (0.25, 0.5, "?", "", ""),
    ]
    assert launching_ops(events, 1, ("elementwise / normalisation (ATen)",), top=1)[0][0] == 6.0


def test_step_benchmark_kernel_categories():
    """The profile's categories of kernel names as Hopper prints them (first matching rule wins)."""
    from bench.step import kernel_category

    assert kernel_category("_attention_jvp_bwd_kv") == "attention (ours, JVP)"
    assert kernel_category("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "GEMM"
    assert kernel_category("_ema_update_kernel") == "optimizer + EMAs"  # kernels/ema.py
    assert kernel_category("void at::native::lerp_kernel_tensor_weight") == "optimizer + EMAs"
    assert kernel_category("triton_poi_fused_gelu_view_15") == "elementwise / normalisation (Inductor)"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>") == (
        "elementwise / normalisation (ATen)"
    )
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention (SDPA)"


def test_step_benchmark_plain_variants_are_checked_before_any_gpu_work(monkeypatch, capsys):
    """Flow-matching and generation variants (and a generation profile) parse in main() before the GPU is touched;
    ``--dry-run`` stops there."""
    from bench.step import main, parse_plain

    assert parse_plain("gen", "compile+fp8+pdl:mode=max-autotune") == ("compile", ["fp8", "pdl"], "max-autotune")
    assert parse_plain("fm", "blocks") == ("blocks", [], None)
    for argv, match in (
        (["--plain", "fm:blocks+gelu"], r"\+gelu is a generation option .* not fm"),
        (["--plain", "gen:compiled"], "bad plain variant 'compiled'"),
        (["--profile", "gen:compile+fp16"], "bad plain variant 'compile\\+fp16'"),
    ):
        monkeypatch.setattr("sys.argv", ["step.py", "--variants", "", *argv])
        with pytest.raises(SystemExit, match=match):
            main()
    monkeypatch.setattr(
        "sys.argv", ["step.py", "--variants", "explicit:triton:fp8=1", "--plain", "gen:compile", "--dry-run"]
    )
    main()
    assert "1 timed, 1 checked, 1 flow-matching or generation variants: all parse" in capsys.readouterr().out
