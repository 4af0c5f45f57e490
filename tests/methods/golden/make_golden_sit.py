"""Records the float64 golden trajectory of today's SiT that ``tests/methods/test_sit_golden.py`` checks.

Run it ONLY deliberately, when SiT's math changes on purpose::

    python tests/methods/golden/make_golden_sit.py

and say in the commit message what changed and why the new numbers are right. What is recorded (``sit_vit.pt``, a
tiny ViT at 16 px with patch 4): ``init``, the state after seeded construction; per step, for 3 steps, the loss and
the logged statistics (contrastive and reconstruction terms included) and the momentum; ``masks``, the corruption
masks of each step; ``grads``, every gradient after step 1; ``final``, the state after step 3. As the trainer runs
it: AdamW (biases and norms not decayed), a fixed lr, per-parameter clipping at 3.0, ``train_step`` then
``on_step_end(step, TOTAL_STEPS)``; the corruption draws from the global RNG, seeded before each step. Built without
the config system, drop path off, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import record_in_float64, record_steps, state, views, write_golden  # noqa: E402, F401 (state: for the tests)

from mobyssl.data.gmml import GMMLCorruption  # noqa: E402
from mobyssl.methods import SiT  # noqa: E402
from mobyssl.models import create_backbone  # noqa: E402
from mobyssl.train.optim import build_adamw  # noqa: E402
from mobyssl.train.trainer import make_scaler, train_step  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0
BATCH, IMAGE, STEPS, TOTAL_STEPS = 8, 16, 3, 10
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-4, 0.04, (0.9, 0.999), 3.0
HEADS = dict(out_dim=16, hidden_dim=32, head_layers=3, temperature=0.2, lmbda=2.0, momentum=0.9)
CORRUPTION = GMMLCorruption(drop_perc=0.5, drop_replace=0.3, drop_align=1, drop_types=("zeros", "noise", "copy"))
BACKBONE = ("vit_tiny_patch16_224", dict(img_size=IMAGE, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                         mlp_ratio=2.0))
STATS = ("loss", "contrastive", "reconstruction", "pos_sim", "neg_sim", "feature_std")
# Compared to 1e-8 instead of 1e-10 in the final state: the contrastive head's Linear biases are each followed by a
# BatchNorm over the batch, so their gradient is zero by construction; AdamW turns its rounding noise into steps of up
# to lr * noise / eps that change with the thread count and SIMD kernels (measured: up to 2e-9 apart), and the
# BatchNorm running means and the teacher's EMA copies carry that noise. Any real change of the math moves these by
# far more (the weights move by ~1e-4 per step).
NOISE_ONLY = {r"^(student|teacher)_head\.mlp\.[036]\.bias$": 1e-8,
              r"^(student|teacher)_head\.mlp\.[147]\.running_mean$": 1e-8}


def golden_path(name: str = "vit") -> Path:
    return HERE / f"sit_{name}.pt"


def build(name: str = "vit") -> SiT:
    """The method under ``torch.manual_seed(SEED)``; call with float64 as the default dtype."""
    timm_name, kwargs = BACKBONE
    torch.manual_seed(SEED)
    return SiT(lambda dpr: create_backbone(timm_name, drop_path_rate=dpr, **kwargs), drop_path_rate=0.0,
               teacher_drop_path_rate=0.0, corruption=CORRUPTION, **HEADS)


def run(method: SiT) -> dict:
    """``STEPS`` optimizer steps as the trainer takes them; returns what is recorded."""
    cpu = torch.device("cpu")
    method.train()
    optimizer = build_adamw(method.trainable_modules(), LR, WEIGHT_DECAY, BETAS, cpu)
    scaler = make_scaler(cpu, None)
    masks = []
    real = method.criterion.forward

    def keep_mask(*args):
        masks.append(args[-1].clone())
        return real(*args)

    def take_step(step):
        torch.manual_seed(100 + step)  # the corruption's draws
        return train_step(method, views(step)[:2], optimizer, scaler, LR, CLIP, None, clip_mode="per_parameter")

    method.criterion.forward = keep_mask
    try:
        rec = record_steps(method, STEPS, TOTAL_STEPS, take_step, STATS)
    finally:
        del method.criterion.forward
    rec["masks"] = torch.stack(masks)
    return rec


def record(name: str = "vit") -> dict:
    return record_in_float64(lambda: build(name), run, {"backbone": name})


def main() -> int:
    write_golden(golden_path(), record())
    return 0


if __name__ == "__main__":
    sys.exit(main())
