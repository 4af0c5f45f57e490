#!/usr/bin/env bash
# The CIFAR-10 speedrun on the device (issue #9, section 3), in one command.
#   BUDGET=5.5 EXTRA="model.backbone=vit_tiny_patch4_32" bash benchmarks/gpu_speedrun.sh
#   BUDGET=8.5 EPOCHS=140 EXTRA="... train.batch_size=1024" bash benchmarks/gpu_speedrun.sh   # no calibration run
# Needs .data/train.zip.xz and .data/test.zip.xz (`xz -6 -c ../shared/data/cifar10/train.zip > .data/train.zip.xz`,
# the same for test.zip: the JPEG zips
# shrink from 61 MB to 19 MB, so both fit in one call's carry) and the wheels in .whl/.
set -u
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p .data/cifar10
python3 - <<'PY'
import lzma, shutil
for split in ("train", "test"):
    with lzma.open(f".data/{split}.zip.xz") as src, open(f".data/cifar10/{split}.zip", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
PY
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout "${LIMIT:-540}" python3 benchmarks/cifar10_speedrun.py --budgets "${BUDGET:-5.5}" --config "${CONFIG:-moby_vit_small_cifar10}" \
    --curve-every "${CURVE:-1}" ${EPOCHS:+--epochs $EPOCHS} --keep "$OUT" data.train=.data/cifar10/train.zip data.test=.data/cifar10/test.zip \
    data.pipeline=gpu_resident train.compile=true train.amp=bf16 'knn.k=[20]' knn.temperature=0.07 ${EXTRA:-} \
    2>&1 | grep -v "^\[step" | tee "$OUT/speedrun.log" | tail -40
