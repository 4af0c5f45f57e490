#!/usr/bin/env bash
# Every training path on a GPU, in one command (issue #9, section 1), then the throughput table.
#
#   bash benchmarks/gpu_smoke.sh                 # on the device: install, GPU tests, the run matrix, throughput
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_smoke.sh   # dry run of the script itself on a CPU
#
# The install uses what the machine has (`pip install --no-deps --no-build-isolation -e .`); wheels it lacks
# (pydantic and its parts) are read from .whl/ when that folder exists. Each run is time-boxed and
# checked: exit status 0, the expected number of steps in metrics.jsonl, every loss finite. Logs go to
# $OUT/smoke_logs.tar.gz, the pass/fail table to $OUT/smoke.md (and stdout, last).
set -u
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d /tmp/mobyssl-smoke-XXXX)
export PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs" "$WORK/status" "$OUT"
T0=$(date +%s)
say() { echo "[smoke +$(( $(date +%s) - T0 ))s] $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v mobyssl >/dev/null 2>&1 || [ "$DEVICE" != cpu ]; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/logs/install.log" 2>&1 \
        || { say "pip install -e . failed (see install.log); using PYTHONPATH"; export PYTHONPATH=$PWD:${PYTHONPATH:-}; }
fi
MOBYSSL="python3 -m mobyssl"
python3 - <<'EOF'
import torch, timm, torchvision
print("torch", torch.__version__, "| timm", timm.__version__, "| torchvision", torchvision.__version__,
      "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
EOF

# job NAME TIMEOUT STEPS command...: run in the background; the check writes one table row to status/NAME.
job() {
    local name=$1 limit=$2 steps=$3; shift 3
    (
        local t=$(date +%s)
        timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
        local rc=$?
        local dir
        dir=$(grep -o 'output_dir=[^ ]*' <<<"$*" | tail -1 | cut -d= -f2)
        python3 - "$name" "$rc" "$(( $(date +%s) - t ))" "$steps" "${dir:-}" >"$WORK/status/$name" <<'EOF'
import json, math, os, sys
name, rc, wall, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
rows = []
if out and os.path.exists(os.path.join(out, "metrics.jsonl")):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
train = [r for r in rows if r.get("type") == "train"]
losses = [r["loss"] for r in train if "loss" in r]
finite = all(math.isfinite(x) for x in losses)
last = train[-1] if train else {}
ok = rc == 0 and (steps == 0 or (last.get("step") == steps and losses and finite))
detail = f"steps {last.get('step', '-')}/{steps}, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no losses"
if steps == 0:
    detail = "-"
skipped = last.get("skipped_steps", 0)
print(f"| {name} | {'PASS' if ok else 'FAIL'} | rc {rc} | {wall} s | {detail} | skipped {skipped} |")
EOF
    ) &
}

RUNS=$WORK/runs
COMMON="train.device=$DEVICE train.knn_every=-1 train.log_every=1 data.num_workers=2"
AMPS="bf16 fp16"; PIPES="cpu gpu_decode gpu_resident"; STEPS=12
METHODS=${METHODS:-quickstart dino_quickstart esvit_quickstart mocov3_quickstart sit_quickstart}
if [ "$DEVICE" = cpu ]; then AMPS="off"; fi
if [ "$QUICK" = 1 ]; then PIPES="gpu_resident"; STEPS=3; fi

say "GPU-marked tests"
job pytest_gpu 240 0 python3 -m pytest -q -m gpu -p no:cacheprovider tests

say "eager matrix: every method x pipeline x amp"
for recipe in $METHODS; do for p in $PIPES; do for a in $AMPS; do
    n=${recipe%_quickstart}; n=${n/quickstart/moby}_${p}_${a}
    job "$n" 180 $STEPS $MOBYSSL pretrain --config "$recipe" $COMMON train.amp=$a data.pipeline=$p \
        train.max_steps=$STEPS output_dir=$RUNS/$n
done; done; wait; done  # one method at a time: 6 runs share the GPU and the CPUs
say "compiled: every method x amp (gpu_resident), Swin on 32 px; torchrun (NCCL), resume, knn, linear"
for recipe in $METHODS; do for a in $AMPS; do
    n=${recipe%_quickstart}; n=${n/quickstart/moby}_compiled_${a}
    job "$n" 300 $STEPS $MOBYSSL pretrain --config "$recipe" $COMMON train.amp=$a data.pipeline=gpu_resident \
        train.compile=true train.max_steps=$STEPS output_dir=$RUNS/$n
done; done
job swin32_compiled 300 $STEPS $MOBYSSL pretrain --config moby_swin_cifar10 $COMMON train.amp=${AMPS%% *} \
    data.train=bundled:cifar10-sample-train data.test=bundled:cifar10-sample-test train.batch_size=64 \
    method.queue_size=256 data.pipeline=gpu_resident train.compile=true train.max_steps=$STEPS \
    output_dir=$RUNS/swin32_compiled
(
    D=$RUNS/torchrun
    timeout 200 torchrun --standalone --nproc_per_node 1 -m mobyssl pretrain $COMMON train.amp=${AMPS%% *} \
        train.max_steps=6 output_dir=$D >"$WORK/logs/torchrun.log" 2>&1
    echo "| torchrun_nccl (6 steps) | $([ $? = 0 ] && echo PASS || echo FAIL) | see log | | | |" >"$WORK/status/torchrun"
    job torchrun_resume 200 12 torchrun --standalone --nproc_per_node 1 -m mobyssl pretrain output_dir=$D --resume \
        train.max_steps=12 --accept-changes
    wait
    job knn 120 0 $MOBYSSL knn --checkpoint "$D/checkpoint.pth" train.device=$DEVICE --output "$WORK/knn.json"
    job linear_fast 200 0 $MOBYSSL linear --checkpoint "$D/checkpoint.pth" train.device=$DEVICE linear.mode=fast \
        linear.epochs=5 --output "$WORK/linear.json"
    job fewshot 200 0 $MOBYSSL fewshot --checkpoint "$D/checkpoint.pth" train.device=$DEVICE --output "$WORK/fewshot.json"
    job correspondence 120 0 $MOBYSSL correspondence --checkpoint "$D/checkpoint.pth" train.device=$DEVICE \
        --output "$WORK/correspondence.json"
    job visualize 120 0 $MOBYSSL visualize --run "$D" --k 4 train.device=$DEVICE --out "$WORK/pictures"
    job finetune 240 0 $MOBYSSL finetune --checkpoint "$D/checkpoint.pth" train.device=$DEVICE train.amp=${AMPS%% *} \
        finetune.epochs=2 finetune.batch_size=64 finetune.output_dir=$RUNS/finetune
    job finetune_compiled 300 0 $MOBYSSL finetune --checkpoint "$D/checkpoint.pth" train.device=$DEVICE \
        train.amp=${AMPS%% *} train.compile=true finetune.epochs=1 finetune.batch_size=64 \
        finetune.output_dir=$RUNS/finetune_compiled
    wait
) &
wait
say "matrix done"
{
    echo "| run | result | exit | wall | steps and loss | skipped steps |"
    echo "|---|---|---|---|---|---|"
    cat "$WORK"/status/* 2>/dev/null
    for f in "$WORK"/knn.json "$WORK"/linear.json "$WORK"/fewshot.json "$WORK"/correspondence.json; do [ -f "$f" ] && echo "$(basename "$f"): $(cat "$f")"; done
} >"$OUT/smoke.md"
tar -czf "$OUT/smoke_logs.tar.gz" -C "$WORK" logs 2>/dev/null

if [ "$DEVICE" != cpu ]; then
    say "GMML corruption on the device (ms per view; host waits, also by CUDA's sync debug mode)"
    timeout 120 python3 benchmarks/gmml_corruption.py --device "$DEVICE" --batch 64 256 2>&1 | tee "$OUT/gmml.log"
fi
if [ "${THROUGHPUT:-1}" = 1 ] && [ "$DEVICE" != cpu ]; then
    say "throughput (model only eager + compiled, end to end through the three pipelines)"
    timeout "${THROUGHPUT_LIMIT:-270}" python3 benchmarks/throughput.py --backbones deit_small swin_tiny --batch 128 \
        --compile --e2e-images 3072 --steps 20 --warmup 5 2>&1 | tee "$OUT/throughput.log"
fi
say "done"
cat "$OUT/smoke.md"
