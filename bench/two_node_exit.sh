#!/usr/bin/env bash
# How often a two-node CPU run of train.py fails to exit cleanly (docs/benchmarks.md, "Two-node exit"):
# RUNS times, two torchrun agents (--nnodes=2, c10d rendezvous, gloo) train the tiny quick config
# of tests/train/test_multinode.py for 8 steps, while BUSY busy loops load the CPUs. Prints one line
# per run with both agents' exit codes and a count at the end; each run's logs stay in OUT/run<i>/.
#
#   RUNS=40 BUSY=4 bash bench/two_node_exit.sh
#
# Before distributed.exit_process (2026-12-05) about 1 run in 15-20 failed on a 2-core machine with
# 4 busy loops: rank 1 aborted at interpreter exit ("terminate called without an active exception").
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-40}" busy="${BUSY:-4}" out="${OUT:-$(mktemp -d)}"
loops=()
for _ in $(seq 1 "$busy"); do
    bash -c 'while :; do :; done' &
    loops+=($!)
done
trap 'kill "${loops[@]}" 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
    dir="$out/run$i"
    mkdir -p "$dir"
    port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    cmd=(python3 -m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d
        "--rdzv-endpoint=127.0.0.1:$port" --rdzv-id=two-node-exit --max-restarts=0
        train.py --config-name=tiny network.hidden_size=32 network.depth=2 network.num_heads=2
        training.batch_size=16 training.kimg_per_tick=0.032 training.metrics=[] training.do_log_image=false
        training.ckpt_ticks=1 training.snapshot_ticks=1000 training.total_ticks=4 training.preempt_check_steps=1
        optimizer.lr=1e-4 "run_dir=$dir/run")
    OMP_NUM_THREADS=1 PYTHONPATH=. timeout 150 "${cmd[@]}" >"$dir/a.log" 2>&1 &
    a=$!
    OMP_NUM_THREADS=1 PYTHONPATH=. timeout 150 "${cmd[@]}" >"$dir/b.log" 2>&1 &
    b=$!
    wait $a; ra=$?
    wait $b; rb=$?
    echo "run $i: exit codes $ra $rb"
    [ "$ra" -eq 0 ] && [ "$rb" -eq 0 ] || failed=$((failed + 1))
done
echo "$failed of $runs runs failed (logs in $out)"
