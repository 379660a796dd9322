#!/usr/bin/env bash
# The GPU checks of issue 11 in one prepared run, each step under its own time limit so one failure leaves the
# others' results (the runs of 2026-11-30 and 2026-12-04 are in benchmarks/RESULTS.md):
#   vc2, animatediff  benchmarks/bench_redpo.py at native size, --reference teacher (the figures), every
#                     row group, --warmup 1 --repeats 3 (median of 3; p10/p90 are then about the min/max)
#   vc2-compile       the same for vc2 with --compile (torch.compile's time is in the warm-up)
#   toyloop           one reduced round of the toy loop on CUDA (every stage's CUDA path: probes, pruning,
#                     make_pairs, filter, redpo, evaluate), timed
#   vc2-speed, animatediff-speed
#                     the training step only, with the bench's --variants side by side and a profile of each 'ours'
#                     row (kernel time by kind, top kernels, the share of the step the GPU is busy); vc2 adds the
#                     sampler agreement check (2026-12-04: cudnn-benchmark and channels-last measured, no gain;
#                     the default VARIANTS are now the untried ones, bf16-weights first)
#   vc2-compile-blocks, animatediff-compile-blocks
#                     the training step with regionally compiled UNets, alone (it did not finish compiling inside
#                     the speed steps of 2026-12-04, so it gets a step and a limit of its own)
#   vc2-compile-train the training step only, the whole UNets compiled (given what is left of DEADLINE)
# Each step's whole output goes to OUT_DIR/<step>.txt (and the benchmarks' JSON to OUT_DIR/<step>.json).
#
# usage: bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]     (default: vc2 animatediff vc2-compile toyloop)
#   DEADLINE=seconds (default 560): a step that would start with less than its limit left is cut to what is left
#   BENCH="--tiny --device cpu": extra arguments for every bench step, VARIANTS: the speed steps' (to try it on a CPU)
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]}
shift
steps=${*:-vc2 animatediff vc2-compile toyloop}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
bench="$py benchmarks/bench_redpo.py ${BENCH:-}"
t0=$(date +%s)
deadline=${DEADLINE:-560}

step() {  # step NAME SECONDS COMMAND... (only the steps asked for)
    local name=$1 limit=$2 start rc left
    shift 2
    [[ " $steps " == *" $name "* ]] || return 0
    left=$(( deadline - ($(date +%s) - t0) ))
    (( left < limit )) && limit=$left
    (( limit < 30 )) && { echo "=== $name: skipped, ${left} s left of DEADLINE"; return 0; }
    echo "=== $name (limit $limit s): $* ($(date -u))"
    start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s"
    grep -v -e '^USDT' -e 'gpuGetDeviceCount' "$out/$name.txt" | tail -n 40
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$py -c "import sys, torch, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
nproc
variants=${VARIANTS:-bf16-weights}
step vc2 180 $bench --model vc2 --reference teacher --warmup 1 --repeats 3 --out "$out/vc2.json"
step animatediff 180 $bench --model animatediff --reference teacher --warmup 1 --repeats 3 \
    --out "$out/animatediff.json"
step vc2-compile 220 $bench --model vc2 --reference teacher --warmup 1 --repeats 3 --compile \
    --out "$out/vc2-compile.json"
step toyloop 100 $py online_loop.py --work-dir "${TMPDIR:-/tmp}/gpu-check-toyloop" --rounds 1 --num-probe 4 \
    --probe-seeds 1 --eval-samples 1 --max-pair-prompts 8 --samples-per-prompt 1 --train-steps 20
step vc2-speed 300 $bench --model vc2 --reference teacher --groups train agreement --warmup 2 --repeats 5 \
    --variants $variants --profile --out "$out/vc2-speed.json"
step animatediff-speed 240 $bench --model animatediff --reference teacher --groups train --warmup 2 --repeats 5 \
    --variants $variants --profile --out "$out/animatediff-speed.json"
step vc2-compile-blocks 420 $bench --model vc2 --reference teacher --groups train --warmup 2 --repeats 5 \
    --variants compile-blocks bf16-weights+compile-blocks --out "$out/vc2-compile-blocks.json"
step animatediff-compile-blocks 420 $bench --model animatediff --reference teacher --groups train --warmup 2 \
    --repeats 5 --variants compile-blocks bf16-weights+compile-blocks --out "$out/animatediff-compile-blocks.json"
step vc2-compile-train 300 $bench --model vc2 --reference teacher --groups train --warmup 2 --repeats 5 \
    --variants compile --out "$out/vc2-compile-train.json"
