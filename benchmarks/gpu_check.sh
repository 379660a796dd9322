#!/usr/bin/env bash
# The GPU checks of issue 11 in one prepared run (about 8 minutes on one H200), each step under its own time
# limit so one failure leaves the others' results:
#   vc2, animatediff  benchmarks/bench_redpo.py at native size, --reference teacher (the figures),
#                     --warmup 1 --repeats 3 (median of 3; p10/p90 are then about the min/max)
#   vc2-compile       the same for vc2 with --compile (torch.compile's time is in the warm-up)
#   toyloop           one reduced round of the toy loop on CUDA (every stage's CUDA path: probes, pruning,
#                     make_pairs, filter, redpo, evaluate), timed
# Each step's whole output goes to OUT_DIR/<step>.txt (and the benchmarks' JSON to OUT_DIR/<step>.json).
#
# usage: bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]     (default: every step, in the order above)
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]}
shift
steps=${*:-vc2 animatediff vc2-compile toyloop}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND... (only the steps asked for)
    local name=$1 limit=$2 start rc
    shift 2
    [[ " $steps " == *" $name "* ]] || return 0
    echo "=== $name: $* ($(date -u))"
    start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s"
    tail -n 30 "$out/$name.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$py -c "import sys, torch, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
nproc
step vc2 180 $py benchmarks/bench_redpo.py --model vc2 --reference teacher --warmup 1 --repeats 3 --out "$out/vc2.json"
step animatediff 180 $py benchmarks/bench_redpo.py --model animatediff --reference teacher --warmup 1 --repeats 3 \
    --out "$out/animatediff.json"
step vc2-compile 220 $py benchmarks/bench_redpo.py --model vc2 --reference teacher --warmup 1 --repeats 3 --compile \
    --out "$out/vc2-compile.json"
step toyloop 100 $py online_loop.py --work-dir "${TMPDIR:-/tmp}/gpu-check-toyloop" --rounds 1 --num-probe 4 \
    --probe-seeds 1 --eval-samples 1 --max-pair-prompts 8 --samples-per-prompt 1 --train-steps 20
