"""SiT's GMML corruption: milliseconds per view and how often the host waits for the device, per setting.

Each row corrupts one view of ``--batch`` random normalised images with ``GMMLCorruption`` as SiT's recipes set it
(pass 1 ``drop_perc``, pass 2 ``drop_replace`` 0.3 with probability 1/2), median of ``--repeats`` calls after one
warm-up call. "waits" counts the ops that make the host wait for the device (``mobyssl.host_sync``), and on CUDA
``torch.cuda.set_sync_debug_mode`` counts them again.

    python benchmarks/gmml_corruption.py --device cpu --threads 1
    python benchmarks/gmml_corruption.py --device cuda --batch 64 256
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from mobyssl.data.gmml import GMMLCorruption
from mobyssl.host_sync import HostSyncCounter, cuda_syncs

SETTINGS = [  # (image size, drop_align, drop_perc, kinds, which recipe)
    (32, 1, 0.5, ("zeros",), "sit_quickstart / sit_vit_small_cifar10"),
    (224, 1, 0.5, ("zeros",), "sit_vit_small_in1k"),
    (224, 16, 0.5, ("zeros",), "patch-aligned blocks"),
    (64, 4, 0.7, ("zeros", "noise", "copy"), "every kind"),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{datetime.date.today()}, torch {torch.__version__}, {name}")
    print("| image | align | drop_perc | kinds | recipe | batch | ms per view | host waits per view |")
    print("|---|---|---|---|---|---|---|---|")
    for size, align, perc, kinds, recipe in SETTINGS:
        corruption = GMMLCorruption(drop_perc=perc, drop_replace=0.3, drop_align=align, drop_types=kinds)
        for batch in args.batch:
            torch.manual_seed(0)
            images = torch.randn(batch, 3, size, size, device=device)
            corruption(images)
            sync(device)
            with HostSyncCounter() as waits:
                corruption(images)
            counted = f"{waits.total}"
            if device.type == "cuda":
                counted += f" (CUDA: {cuda_syncs(corruption, images)[1]})"
            times = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                corruption(images)
                sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            print(f"| {size} px | {align} | {perc} | {'+'.join(kinds)} | {recipe} | {batch} | "
                  f"{statistics.median(times):.2f} | {counted} |", flush=True)


if __name__ == "__main__":
    main()
