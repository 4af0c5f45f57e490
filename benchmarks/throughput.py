"""MoBY training throughput: model-only (synthetic inputs on the device) and end to end (JPEG zip -> step).

Prints one markdown row per measurement: img/s, model TFLOP/s (counted with torch's FlopCounterMode),
the fraction of a given peak, and peak device memory. Eager and compiled model-only runs are measured
in the same process so their ratio is honest.

    python benchmarks/throughput.py                                  # Swin-T and DeiT-S at 224, GPU
    python benchmarks/throughput.py --backbones swin_tiny --batch 64 128 256 --compile
    python benchmarks/throughput.py --backbones deit_small --batch 128 --compile --e2e-images 3072 \
        --profile-dir prof                                           # + torch.profiler tables per mode
    python benchmarks/throughput.py --recipe moby_vit_small_cifar10 --backbones vit_tiny_patch4_32 --image-size 32 \
        --batch 512 --compile --pipelines gpu_resident --e2e-zip cifar10/train.zip   # the CIFAR-10 speedrun's step
    python benchmarks/throughput.py --device cpu --backbones vit_nano_patch4_32 --image-size 32 \\
        --batch 16 --steps 3 --warmup 1 --e2e-images 64               # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import tempfile
import time
import zipfile

import numpy as np
import torch
from PIL import Image

from mobyssl.build import build_method, build_train_dataset, make_loader
from mobyssl.config import load_config
from mobyssl.data.sampler import GlobalBatchSampler
from mobyssl.runtime import resolve_amp
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import train_step


def make_jpeg_zip(path: str, n: int, size=(500, 375)) -> None:
    """``n`` random-texture JPEGs of ImageNet-like size in an ImageFolder zip."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(n):
            small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            z.writestr(f"class{i % 10}/{i:06d}.jpg", buf.getvalue())


def _setup(args, backbone, device, batch, extra=()):
    cfg = load_config(args.recipe, [f"model.backbone={backbone}", f"data.image_size={args.image_size}",
                                    f"train.batch_size={batch}", f"method.queue_size={batch * 16}",
                                    *args.overrides, *extra])
    method = build_method(cfg).to(device).train()
    opt = build_adamw(method.trainable_modules(), 1e-4, 0.05, (0.9, 0.999), device)
    amp = resolve_amp("auto" if device.type == "cuda" else "off", device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return cfg, method, opt, amp, scaler


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _count_flops(model, views, opt, scaler, amp) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(model, views, opt, scaler, 0.0, 5.0, amp)
    return counter.get_total_flops()


def _profile(args, name: str, step) -> None:
    """A few steps under torch.profiler; the top kernels by device time go to <profile-dir>/<name>.txt."""
    if not args.profile_dir:
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    os.makedirs(args.profile_dir, exist_ok=True)
    with open(os.path.join(args.profile_dir, f"{name}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def model_only(args, backbone, device, batch: int, compile_: bool) -> dict:
    cfg, method, opt, amp, scaler = _setup(args, backbone, device, batch)
    views = [torch.randn(batch, 3, args.image_size, args.image_size, device=device) for _ in range(2)]
    flops = _count_flops(method, views, opt, scaler, amp)
    model = torch.compile(method) if compile_ else method
    for _ in range(args.warmup):
        train_step(model, views, opt, scaler, 1e-4, 5.0, amp)
        method.on_step_end(1, 100)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        train_step(model, views, opt, scaler, 1e-4, 5.0, amp)
        method.on_step_end(i + 2, 100)
    _sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    def one_step():
        train_step(model, views, opt, scaler, 1e-4, 5.0, amp)
        method.on_step_end(2, 100)

    _profile(args, f"{backbone}_b{batch}_model_{'compiled' if compile_ else 'eager'}", one_step)
    return {"img_s": batch / dt, "tflops": flops / dt / 1e12, "mem_gib": mem}


def end_to_end(args, backbone, device, batch: int, zip_path: str, pipeline: str, compile_: bool) -> dict:
    cfg, method, opt, amp, scaler = _setup(args, backbone, device, batch, [
        f"data.train={zip_path}", "data.test=null", f"data.num_workers={args.workers}", f"data.pipeline={pipeline}"])
    model = torch.compile(method) if compile_ else method
    dataset = build_train_dataset(cfg)
    sampler = GlobalBatchSampler(len(dataset), batch, yield_epoch=True)
    if pipeline != "cpu":
        from mobyssl.build import device_loader

        loader = device_loader(cfg, dataset.dataset, sampler, batch, device)
    else:
        loader = make_loader(dataset, batch, args.workers, device, drop_last=True, sampler=sampler)

    def batches():
        for epoch in range(1000):
            sampler.set_epoch(epoch)
            yield from loader

    stream = batches()

    def one_step(step=0):
        views, _, _ = next(stream)
        views = [v.to(device, non_blocking=True) for v in views]
        train_step(model, views, opt, scaler, 1e-4, 5.0, amp)
        method.on_step_end(step + 1, 10_000)

    for step in range(args.warmup):
        one_step(step)
    _sync(device)
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        one_step(step)
    _sync(device)
    img_s = batch * args.steps / (time.perf_counter() - t0)
    _profile(args, f"{backbone}_b{batch}_e2e_{pipeline}_{'compiled' if compile_ else 'eager'}", one_step)
    return {"img_s": img_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["swin_tiny", "deit_small"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[128], help="per-GPU batch sizes, one row each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (model-only and end to end)")
    p.add_argument("--compiled-only", action="store_true", help="measure only the compiled runs")
    p.add_argument("--pipelines", nargs="+", default=["cpu", "gpu_decode", "gpu_resident"],
                   choices=["cpu", "gpu_decode", "gpu_resident"], help="end-to-end pipelines to measure")
    p.add_argument("--profile-dir", help="write a torch.profiler table (top 40 kernels) per measurement here")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 matrix peak for the fraction column")
    p.add_argument("--e2e-images", type=int, default=0, help="also run end to end on this many generated JPEGs")
    p.add_argument("--e2e-zip", help="end to end on this zip of JPEGs instead of generated ones")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--recipe", default="moby_swin_tiny_in1k", help="recipe the runs start from (augmentation, "
                   "heads); backbone, image size and batch come from the options above")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to the recipe")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"| date | device | torch | backbone | batch | mode | img/s | TFLOP/s | % of {args.peak_tflops:g} | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    row = f"| {datetime.date.today()} | {name} | {torch.__version__} | {{}} | {{}} | {{}} | {{:.0f}} | {{}} | {{}} | {{}} |"
    zip_path = args.e2e_zip
    if args.e2e_images and not zip_path:
        zip_path = os.path.join(tempfile.mkdtemp(), "jpegs.zip")
        make_jpeg_zip(zip_path, args.e2e_images)
    labels = {"cpu": "CPU workers", "gpu_decode": "device decode + augmentation",
              "gpu_resident": "resident uint8 + device augmentation"}
    modes = [True] if args.compiled_only else [False, True] if args.compile else [False]
    for backbone in args.backbones:
        for batch in args.batch:
            for c in modes:
                r = model_only(args, backbone, device, batch, c)
                print(row.format(backbone, batch, "model-only, " + ("compiled" if c else "eager"), r["img_s"],
                                 f"{r['tflops']:.1f}", f"{100 * r['tflops'] / args.peak_tflops:.1f}%",
                                 f"{r['mem_gib']:.1f}"), flush=True)
            for pipeline in args.pipelines if zip_path else ():
                for c in modes:
                    r = end_to_end(args, backbone, device, batch, zip_path, pipeline, c)
                    print(row.format(backbone, batch, f"end to end, {labels[pipeline]}, "
                                     + ("compiled" if c else "eager"), r["img_s"], "-", "-", "-"), flush=True)

if __name__ == "__main__":
    main()
