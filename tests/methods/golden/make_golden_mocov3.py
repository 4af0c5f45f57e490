"""Records the float64 golden trajectory of today's MoCo v3 that ``tests/methods/test_mocov3_golden.py`` checks.

Run it ONLY deliberately, when MoCo v3's math changes on purpose::

    python tests/methods/golden/make_golden_mocov3.py

and say in the commit message what changed and why the new numbers are right (``benchmarks/check_mocov3.py``
compares this trajectory with the official MoCo v3 code). What is recorded (``mocov3_vit.pt``, a tiny ViT with MoCo
v3's init, sin-cos position table and frozen patch projection): ``init``, the state after seeded construction;
per step, for 4 steps, the loss and the logged statistics, the lr and the momentum; ``grads``, every gradient after
step 1; ``final``, the state after step 4. As the trainer runs it: AdamW over every parameter with weight decay
(MoCo v3's single group), lr warm-up then cosine to 0 per step (``warmup_cosine``), no clipping, ``train_step``
then ``on_step_end(step, TOTAL_STEPS)``. Built without the config system, drop path off, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import record_in_float64, record_steps, state, views, write_golden  # noqa: E402, F401 (state: for the tests)

from mobyssl.methods import MoCoV3  # noqa: E402
from mobyssl.models import create_backbone  # noqa: E402
from mobyssl.train.optim import build_adamw, warmup_cosine  # noqa: E402
from mobyssl.train.trainer import make_scaler, train_step  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0
BATCH, IMAGE, STEPS, TOTAL_STEPS, WARMUP_STEPS = 8, 16, 4, 6, 2
LR, WEIGHT_DECAY, BETAS = 1e-4, 0.1, (0.9, 0.999)
HEADS = dict(proj_hidden_dim=32, proj_dim=16, temperature=0.2, momentum=0.9)
BACKBONE = ("vit_tiny_patch16_224", dict(img_size=IMAGE, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                         mlp_ratio=2.0))
STATS = ("loss", "pos_sim", "neg_sim", "feature_std")


def golden_path(name: str = "vit") -> Path:
    return HERE / f"mocov3_{name}.pt"


def build(name: str = "vit") -> MoCoV3:
    """The method under ``torch.manual_seed(SEED)``; call with float64 as the default dtype."""
    timm_name, kwargs = BACKBONE
    torch.manual_seed(SEED)
    return MoCoV3(lambda dpr: create_backbone(timm_name, drop_path_rate=dpr, **kwargs), drop_path_rate=0.0,
                  target_drop_path_rate=0.0, **HEADS)


def lrs() -> list[float]:
    return warmup_cosine(LR, 0.0, TOTAL_STEPS, WARMUP_STEPS).tolist()


def run(method: MoCoV3) -> dict:
    """``STEPS`` optimizer steps as the trainer takes them; returns what is recorded."""
    cpu = torch.device("cpu")
    method.train()
    optimizer = build_adamw(method.trainable_modules(), LR, WEIGHT_DECAY, BETAS, cpu,
                            decay_all=method.decay_every_parameter)
    scaler = make_scaler(cpu, None)
    rec = record_steps(method, STEPS, TOTAL_STEPS,
                       lambda step: train_step(method, views(step), optimizer, scaler, lrs()[step - 1], None, None),
                       STATS)
    rec["lr"] = torch.tensor(lrs()[:STEPS], dtype=torch.float64)
    return rec


def record(name: str = "vit") -> dict:
    return record_in_float64(lambda: build(name), run, {"backbone": name})


def main() -> int:
    write_golden(golden_path(), record())
    return 0


if __name__ == "__main__":
    sys.exit(main())
