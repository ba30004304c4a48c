#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md as device calls, one call per part, each inside a 600 s call
# limit, so that every row of a round comes from one machine start (the machine stays warm
# between calls; run the parts back to back, most important first).
#
#   bash bench/device_calls.sh PART
#
# PART: profile | full | full-check | full-graphs | autotune | autotune-check | rows | split | split-graphs | split-more |
#   split-profile | split-order | graph-test | graph | graph-order | headroom | headroom-high | estimator | launch-ab | plain | gen-profile |
#   gen-autotune | gen-gelu | gen-gelu-autotune | cdt | one-pass | one-pass-256 | layout | layout-ab | round14 | round14-check | pdl | fp8 | round16 | round16-more | round17 | round17-more | round17-aten | ema | levers | 512 | coldstart | fsdp2 | attention
#
# Run from the repository root on the GPU machine. Wheels the machine lacks (hydra-core, omegaconf,
# antlr4-python3-runtime) are installed from .whl/ when that folder exists (docs/benchmarks.md,
# "Running the rows").
# Every part prints its table as it goes and writes its log to $OUT (default: here), so a part cut by
# the call limit still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: bash bench/device_calls.sh profile|full|full-check|full-graphs|autotune|autotune-check|rows|split|split-graphs|split-more|split-profile|split-order|graph-test|graph|graph-order|headroom|headroom-high|estimator|launch-ab|plain|gen-profile|gen-autotune|gen-gelu|gen-gelu-autotune|cdt|one-pass|one-pass-256|layout|layout-ab|round14|round14-check|pdl|fp8|round16|round16-more|round17|round17-more|round17-aten|ema|levers|512|coldstart|fsdp2|attention}"
if [ -d .whl ] && ! python3 -c "import hydra" 2>/dev/null; then
    site="$(mktemp -d)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
default=explicit:triton:blocks:budget=0.7:split=1:fm_budget=1.0 # the configs' training step (im256_w2.yaml)
joint=explicit:triton:blocks:budget=0.7 # the same with one backward of the sum (the configs' step until 2026-12-06)
step() { python3 bench/step.py --steps 6 --warmup 3 "$@"; }
gpu_tests() { TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider "$@"; }
graph_test() { gpu_tests tests/train/test_step_graph.py; }

case "$part" in
profile) # where the time goes, the default step, the launch-plan A/B (issue 16 item 5) and CUDA graphs, checked
    # against torch.func.jvp
    step --profile "$default" --ab-fast-launch "$default" --variants "$default:mode=reduce-overhead" --check "$default" \
        --plain '' ;;
full) # the whole loss forward compiled as one graph (network.compile_scope=full), which also fuses the casts and
    # the loss arithmetic outside the blocks, at budgets 0.7 and 0.5: the budget is a share of what the whole
    # graph would keep (its inputs include every parameter), so 0.7 keeps more than 0.7 of the blocks does
    # (2026-12-06: the whole graph's compile takes minutes per shape, so the check runs in its own call)
    full=${default/blocks/compile}
    step --variants "${full/0.7/0.5},$full" --check '' --plain '' ;;
full-check) # the 'full' part's check against torch.func.jvp (bf16, batch 4), in a call of its own
    full=${default/blocks/compile}
    step --variants '' --check "${full/0.7/0.5}" --plain '' ;;
full-graphs) # with CUDA graphs, the budget of the 'full' part that stays within 32 GiB: BUDGET_FULL=0.5 bash ...
    step --variants "explicit:triton:compile:budget=${BUDGET_FULL:?set BUDGET_FULL}:mode=reduce-overhead" \
        --check '' --plain '' ;;
autotune) # autotuned GEMM templates with fused epilogues, with CUDA graphs (network.compile_mode=max-autotune),
    # after the default and its CUDA-graph row in the same process as the baseline (the autotuning of a batch-4 check
    # would double the call's compile time: its check is the part 'autotune-check')
    step --variants "$default,$default:mode=reduce-overhead,$default:mode=max-autotune" --check '' --plain '' ;;
autotune-check) # the 'autotune' variant's check against torch.func.jvp (bf16, batch 4), and the default's
    step --variants '' --check "$default,$default:mode=max-autotune" --plain '' ;;
rows) # the default step's check against torch.func.jvp, the launch-plan A/B on the default step, the compiled
    # flow-matching step and 1-step generation: the rows to re-measure on each machine start (Round 5)
    step --check "$default" --ab-fast-launch "$default" --variants '' --plain fm:blocks,gen:compile ;;
split) # each loss term's backward on its own (training.split_backward), with the flow-matching graphs at budget 1, and
    # as two micro-batches of 16 at budget 1 (no recomputation), after the one-backward step in the same process;
    # the check runs the split path against torch.func.jvp
    step --variants "$joint,$default,${joint/0.7/1.0}:rounds=2:split=1" --check "$default" --plain '' ;;
split-graphs) # the same two steps with CUDA graphs per block, and the one-backward step at budget 1 (no recomputation)
    step --variants "$joint:mode=reduce-overhead,$default:mode=reduce-overhead,${joint/0.7/1.0}" --check '' --plain '' ;;
split-more) # two micro-batches of 16 at budget 1 with CUDA graphs; the split step with the recomputation priced by
    # measured op time (estimator=profile)
    step --variants "${joint/0.7/1.0}:rounds=2:split=1:mode=reduce-overhead,$default:estimator=profile" --check '' \
        --plain '' ;;
split-profile) # where the time of the split step goes; the compiled flow-matching step
    step --profile "$default" --variants '' --check '' --plain fm:blocks ;;
split-order) # the split and one-backward steps in the other order at 256 px, then in both orders at 512 px, batch 8
    step --variants "$default,$joint" --check '' --plain ''
    step --resolution 512 --batch 8 --variants "$joint,$default" --check '' --plain ''
    step --resolution 512 --batch 8 --variants "$default,$joint" --check '' --plain '' ;;
graph-test) # the GPU tests of the whole step as one CUDA graph (a captured tiny run equals the eager run bit for bit;
    # about a minute): the part 'graph' without its A/B, for a call with little device time left
    graph_test ;;
graph) # the whole step as one CUDA graph (training.cuda_graph): the graph's GPU tests, then the default step without
    # and with the graph
    graph_test
    step --variants "$default,$default:graph=1" --check '' --plain '' ;;
graph-order) # the same two steps in the other order at 256 px with the default's check against torch.func.jvp, then
    # in both orders at 512 px, batch 8
    step --variants "$default:graph=1,$default" --check "$default" --plain ''
    step --resolution 512 --batch 8 --variants "$default,$default:graph=1,$default" --check '' --plain '' ;;
headroom) # the split step's peak (27.2 GiB) leaves ≈ 4.8 GiB under the issue's 32 GiB: the terminal-velocity pass's
    # graphs at budgets 0.8 and 0.85 (less recomputation) after the default in the same process
    step --variants "$default,${default/budget=0.7/budget=0.8},${default/budget=0.7/budget=0.85}" --check '' --plain '' ;;
headroom-high) # the terminal-velocity pass's graphs at budgets 0.9, 0.95 and 1 (no recomputation) after the default in the
    # same process: whether a budget above 0.85 keeps a set that still fits 32 GiB and recomputes less (about 6 minutes)
    step --variants "$default,${default/budget=0.7/budget=0.9},${default/budget=0.7/budget=0.95},${default/budget=0.7/budget=1.0}" \
        --check '' --plain '' ;;
estimator) # what the budget recomputes, chosen by FLOP count (PyTorch's default) or by each op's measured time
    step --variants "$default,$default:estimator=profile" --check "$default:estimator=profile" --plain '' ;;
launch-ab) # the attention launch plans on, then off, in one process (issue 16 item 5)
    step --ab-fast-launch "$default" --variants '' --check '' --plain '' ;;
plain) # flow-matching step and 1-step generation (batch 256)
    step --variants '' --check '' --plain fm:blocks,fm:eager,gen:compile,gen:blocks ;;
gen-profile) # where the time of 1-step generation (batch 256, whole DiT compiled) goes
    step --profile gen:compile --variants '' --check '' --plain '' ;;
gen-autotune) # 1-step generation compiled, and with autotuned GEMM templates (generate.py --compile max-autotune-no-cudagraphs)
    step --variants '' --check '' --plain gen:compile,gen:compile:mode=max-autotune-no-cudagraphs ;;
gen-gelu) # 1-step generation with each block's fc1 + GELU as one GEMM (scripts/generate.py --gelu-epilogue): its GPU
    # tests (against float64, bf16 accuracy, the compiled DiT), then compiled without and with it, then with it and
    # the whole DiT replayed as a CUDA graph (about 4 minutes)
    gpu_tests tests/models/test_gelu_epilogue.py
    step --variants '' --check '' --plain gen:compile,gen:compile+gelu,gen:compile+gelu:mode=reduce-overhead ;;
gen-gelu-autotune) # 1-step generation with the GELU epilogue, compiled without and with autotuning (generate.py --compile
    # max-autotune-no-cudagraphs --gelu-epilogue; about 6 minutes)
    step --variants '' --check '' --plain gen:compile+gelu,gen:compile+gelu:mode=max-autotune-no-cudagraphs ;;
cdt) # Inductor's coordinate-descent tuning of its generated kernels (bench option cdt=1 / +cdt): the default step
    # without and with it, 1-step generation (fc1 + GELU as one GEMM) without and with it, then the default step with
    # it and as one CUDA graph (more than 10 minutes: Round 9 measured the first two rows, +29.6% with the tuning)
    step --variants "$default,$default:cdt=1" --check '' --plain gen:compile+gelu,gen:compile+gelu+cdt
    step --variants "$default:graph=1:cdt=1" --check '' --plain '' ;;
one-pass) # the attention kernel's one-pass backward (TVM_ATTENTION_BACKWARD=one-pass): accuracy and kernel rows at
    # N=256 and 1024, B=32 (both backwards), then the default step at 512 px, batch 8, as one CUDA graph with each
    # backward in one process (bench option bwd=one-pass; about 7 minutes; its check runs in one-pass-256: the
    # math reference at 512 px ran out of an H100's memory in Round 10)
    python3 bench/attention.py --sizes 256x32,1024x32 --profile 1024x32
    step --resolution 512 --batch 8 --variants "$default:graph=1,$default:graph=1:bwd=one-pass" --check '' --plain '' ;;
one-pass-256) # the same two steps at 256 px, batch 32, one-pass first and last, the one-pass step checked against
    # torch.func.jvp (about 5 minutes)
    step --variants "$default:graph=1:bwd=one-pass,$default:graph=1,$default:graph=1:bwd=one-pass" \
        --check "$default:bwd=one-pass" --plain '' ;;
layout) # the attention tensors' layouts (Rounds 11-12), each lever taken back alone from the defaults: operands as views
    # of the qkv output (operands=views), outputs contiguous (outputs=contiguous), both (the step before 2026-12-07 but
    # for the EMA kernel), the defaults, then the last two as one CUDA graph (about 6 minutes)
    both=$default:operands=views:outputs=contiguous
    step --variants "$default:operands=views,$default:outputs=contiguous,$both,$default,$both:graph=1,$default:graph=1" \
        --check '' --plain '' ;;
levers) # Rounds 11-13 in one call (about 9 minutes; ran on 2026-12-07 before the three became the defaults, with the
    # variants spelled as they were then): the EMA kernel's GPU tests, the profile of the default step, then the step
    # as before 2026-12-07 (all three taken back), with all three levers (the defaults), and both as one CUDA graph;
    # checked against torch.func.jvp
    gpu_tests tests/kernels/test_ema.py
    before=$default:operands=views:outputs=contiguous:ema=per-tensor
    step --profile "$default" --variants "$before,$default,$before:graph=1,$default:graph=1" --check "$default" \
        --plain '' ;;
layout-ab) # token-major attention outputs against contiguous ones (Round 12): the kernel rows at N=256 and 1024, B=32, then
    # the step pair as one CUDA graph (the layout is an argument of the custom op since the 'levers' part's token-major
    # row failed: Inductor's cache had handed it the graph compiled for contiguous outputs); about 5 minutes
    python3 bench/attention.py --skip-accuracy --sizes 256x32,1024x32
    step --variants "$default:outputs=contiguous:graph=1,$default:graph=1" --check '' --plain '' ;;
round14) # one call for a session that may get one machine start (about 10 minutes, most important first; rows cut by
    # the call limit are lost, the others kept): the layout A/B's kernel rows and its step pair as one CUDA graph, the
    # EMA kernel taken back (as one graph), 1-step generation with the fc1 + GELU epilogue, and 512 px as one graph
    python3 bench/attention.py --skip-accuracy --sizes 256x32,1024x32
    step --variants "$default:outputs=contiguous:graph=1,$default:graph=1,$default:ema=per-tensor:graph=1" --check '' \
        --plain gen:compile+gelu
    step --resolution 512 --batch 8 --variants "$default:graph=1" --check '' --plain '' ;;
round14-check) # the default step's check against torch.func.jvp (bf16, batch 4) and the step as it was before Rounds 11-13
    # (all three levers taken back) as one CUDA graph, for the 'round14' rows of the same machine start (about 3.5 minutes)
    step --check "$default" --variants "$default:operands=views:outputs=contiguous:ema=per-tensor:graph=1" --plain '' ;;
pdl) # Inductor's Triton kernels with programmatic dependent launch (Round 15, bench option pdl=1): the check of the
    # pdl=1 step against torch.func.jvp, the default step and the pdl=1 step as one CUDA graph and without it, then 1-step
    # generation with the fc1 + GELU epilogue without and with it (about 9 minutes)
    step --check "$default:pdl=1" --variants "$default:graph=1,$default:pdl=1:graph=1,$default,$default:pdl=1" \
        --plain gen:compile+gelu,gen:compile+gelu+pdl ;;
fp8) # 1-step generation with the blocks' linear layers as row-wise scaled FP8 GEMMs (Round 16, generate.py --fp8):
    # the GPU tests (the FP8 GEMM against float64, the quantized DiT eager and compiled), then generation compiled,
    # with the GELU epilogue, and with FP8 (each row prints its samples' difference to the eager bf16 network's)
    gpu_tests tests/models/test_fp8.py
    step --variants '' --check '' --plain gen:compile,gen:compile+gelu,gen:compile+fp8 ;;
round16) # Rounds 15 and 16 in one call, for a session that may get one short machine start (about 7 minutes, most
    # important first): the FP8 GPU tests, generation with the GELU epilogue (the best bf16 row) and with FP8; the
    # default step and the pdl=1 step as one CUDA graph
    gpu_tests tests/models/test_fp8.py
    step --variants '' --check '' --plain gen:compile+gelu,gen:compile+fp8
    step --variants "$default:graph=1,$default:pdl=1:graph=1" --check '' --plain '' ;;
round16-more) # what round16 leaves out: generation with FP8 and pdl, and the pdl=1 step's check against torch.func.jvp
    step --variants '' --check "$default:pdl=1" --plain gen:compile+fp8+pdl ;;
round17) # FP8 GEMMs in training (Round 17, network.fp8=true, bench option fp8=1): the FP8 GPU tests (the training GEMMs
    # against float64, the compiled FP8 training DiT against eager), the default step and the fp8=1 step as one CUDA
    # graph, and the fp8=1 step's check against torch.func.jvp with math attention (about 8 minutes)
    gpu_tests tests/models/test_fp8.py
    step --variants "$default:graph=1,$default:fp8=1:graph=1" --check "$default:fp8=1" --plain '' ;;
round17-aten) # round17's FP8 rows with Inductor's GEMM choices restricted to ATen (no Triton scaled-mm templates): the
    # GPU tests and the fp8=1 step with its check (2026-12-08: with the templates allowed, the compiled FP8 gradients
    # were wrong on the GPU)
    export TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN
    gpu_tests tests/models/test_fp8.py -k gpu
    step --variants "$default:fp8=1:graph=1" --check "$default:fp8=1" --plain '' ;;
round17-more) # the same pair at 512 px, batch 8
    step --resolution 512 --batch 8 --variants "$default:graph=1,$default:fp8=1:graph=1" --check '' --plain '' ;;
ema) # the EMA kernel (Round 13): its GPU tests (bits against torch.lerp), then the default step with the per-tensor
    # lerps (ema=per-tensor) and with the kernel (the default), each also as one CUDA graph (about 5 minutes)
    gpu_tests tests/kernels/test_ema.py
    step --variants "$default:ema=per-tensor,$default,$default:ema=per-tensor:graph=1,$default:graph=1" \
        --check '' --plain '' ;;
512) # 512 px, per-GPU batch 8
    step --resolution 512 --batch 8 --variants "$default" --check '' --plain '' ;;
coldstart) # seconds to the first finished step of `bash train.sh 1 im256_w2.yaml`: cold, run-dir cache, local cache
    python3 bench/cold_start.py ;;
fsdp2) # FSDP2 against DDP on one GPU, DiT-XL/2 with compiled blocks
    torchrun --standalone --nproc_per_node=1 bench/fsdp2_step.py --batch 32 --steps 4 ;;
attention) # the attention kernel rows and the profile of its kernels at N=256, B=32
    python3 bench/attention.py --profile 256x32 ;;
*)
    echo "unknown part $part" >&2
    exit 2
    ;;
esac 2>&1 | tee "$out/$part.log"
