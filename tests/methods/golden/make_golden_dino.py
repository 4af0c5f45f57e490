"""Records the float64 golden trajectories of today's DINO and EsViT that ``tests/methods/test_dino_golden.py`` checks.

Run it ONLY deliberately, when DINO's math changes on purpose::

    python tests/methods/golden/make_golden_dino.py [VARIANT ...]    # default: every variant

then say in the commit message what changed in the math and why the new numbers are right. Never re-record to
make a failing golden test pass after a refactor. Recorded after DINO's loss, centre, temperatures, momentum and
last-layer freezing were checked against hand computation and the official ``main_dino.py`` (tests/losses/
test_dino_loss.py, tests/methods/test_dino.py).

Two tiny ViTs (LayerNorms, DINO's resampled position embedding for the smaller crops) and a tiny Swin:

* ``dino_multicrop.pt``: DINO, 2 global crops of 16 px and 2 local crops of 8 px, the head's last layer
  weight-normalised with its norm fixed (DINO's default);
* ``dino_bn_head.pt``: DINO, the 2 global crops only, BatchNorm in the head, the last layer's norm trained;
* ``dino_esvit_swin.pt``: EsViT (view + region terms, two heads per branch) on a Swin with LayerNorm eps 1e-6,
  window 4, a shifted second block, 2 global crops of 16 px and 2 local crops of 6 px (3x3 token maps padded to
  the 4x4 window before the shift, EsViT's way), the last layers' norms trained (EsViT's Swin-T recipe).
  Recorded after EsViT's loss was checked against hand computation (tests/losses/test_dino_loss.py) and its
  Swin windows against the official EsViT Swin (equal in float64 on 48-96 px crops of a 112 px model).

Both run ``STEPS`` optimizer steps as the trainer takes them: ``on_step_start(step - 1, ...)``, ``train_step``
with AdamW (fixed lr, a per-step weight decay as DINO's cosine schedule gives, per-parameter clipping at
``CLIP``, ``epoch`` so that the last layer is frozen during epoch 0), then ``on_step_end(step, ...)``. With 2
steps per epoch and a 2-epoch teacher-temperature warm-up, steps 1-2 run at the warm-up temperature with the
last layer frozen, step 3 at the final temperature with it trained. Recorded: ``init`` (state_dict after
``torch.manual_seed(SEED)`` construction), per step the loss, teacher entropy, KL, teacher temperature and
momentum, every gradient of step 1 and of step 3 (after clipping), and the final state_dict (student, teacher,
heads and the centre). Drop path is off (its draws would tie the numbers to the forward order). Each file must
stay under 1 MB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mobyssl.methods.dino import DINO
from mobyssl.methods.esvit import EsViT
from mobyssl.models import create_backbone
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import make_scaler, train_step

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script or loaded by path from the tests: the recorders share one harness
from make_golden import record_in_float64, state, write_golden  # noqa: E402

SEED = 0
BATCH, GLOBAL, STEPS, TOTAL_STEPS, STEPS_PER_EPOCH = 4, 16, 3, 10, 2
LR, BETAS, CLIP = 1e-4, (0.9, 0.999), 3.0
WEIGHT_DECAY = (0.04, 0.1, 0.25)  # per step: decay rising as DINO's weight-decay schedule does
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=GLOBAL, patch_size=4, embed_dim=24, depth=2, num_heads=2,
                                         mlp_ratio=2.0)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=GLOBAL, patch_size=2, window_size=4, embed_dim=12,
                                                  depths=(2, 1), num_heads=(1, 2), mlp_ratio=2.0,
                                                  layer_norm_eps=1e-6)),
}
HEAD = dict(out_dim=48, hidden_dim=24, bottleneck_dim=16, head_layers=3, momentum=0.9, teacher_temp=0.07,
            warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2, student_temp=0.1, center_momentum=0.9,
            freeze_last_layer=1)
# name: (method, backbone, local crop side, method arguments)
VARIANTS = {
    "multicrop": (DINO, "vit", 8, dict(n_crops=4, use_bn_in_head=False, norm_last_layer=True)),
    "bn_head": (DINO, "vit", 8, dict(n_crops=2, use_bn_in_head=True, norm_last_layer=False)),
    "esvit_swin": (EsViT, "swin", 6, dict(n_crops=4, use_bn_in_head=False, norm_last_layer=False)),
}
STATS = ("loss", "teacher_entropy", "kl_teacher_student")
EXTRA_STATS = {"esvit_swin": ("view_loss", "region_loss")}
# Compared to 1e-8 instead of 1e-10 in the final state of the BatchNorm-head variant: parameters whose gradient is
# zero by construction (a BatchNorm over the batch follows them: the backbone's last LayerNorm bias and the head's
# biases before each BatchNorm) get rounding-noise gradients that AdamW turns into steps of up to lr * noise / eps,
# values of ~1e-10 that change with the thread count and the SIMD kernels (measured: up to 1e-9 apart with 1-2
# threads and ATEN_CPU_CAPABILITY default/avx2/avx512); the BatchNorm running means carry that noise (1e-10). Any
# real change of the math moves these by far more than 1e-8 (the weights move by ~1e-4 per step).
NOISE_ONLY = {
    "bn_head": {r"^(student|teacher)\.norm\.bias$": 1e-8, r"^(student|teacher)_head\.mlp\.[03]\.bias$": 1e-8,
                r"^(student|teacher)_head\.mlp\.[14]\.running_mean$": 1e-8},
}


def golden_path(name: str) -> Path:
    return HERE / f"dino_{name}.pt"


def stats(name: str) -> tuple[str, ...]:
    return STATS + EXTRA_STATS.get(name, ())


def build(name: str) -> DINO:
    """The method under ``torch.manual_seed(SEED)``; call with float64 as the default dtype."""
    method, backbone, _, args = VARIANTS[name]
    timm_name, kwargs = BACKBONES[backbone]

    def backbone_fn(dpr, multi_size=False):
        return create_backbone(timm_name, drop_path_rate=dpr, multi_size=multi_size, **kwargs)

    torch.manual_seed(SEED)
    return method(backbone_fn, drop_path_rate=0.0, teacher_drop_path_rate=0.0, **HEAD, **args)


def views(step: int, name: str) -> list[torch.Tensor]:
    _, _, local, args = VARIANTS[name]
    g = torch.Generator().manual_seed(2000 + step)
    return [torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64)
            for size in [GLOBAL] * 2 + [local] * (args["n_crops"] - 2)]



def run(method: DINO, name: str) -> dict:
    """``STEPS`` optimizer steps of ``method`` (variant ``name``) as the trainer takes them; returns what is
    recorded."""
    cpu = torch.device("cpu")
    method.train()
    optimizer = build_adamw(method.trainable_modules(), LR, WEIGHT_DECAY[0], BETAS, cpu)
    scaler = make_scaler(cpu, None)
    rec: dict = {k: [] for k in (*stats(name), "teacher_temp", "momentum")}
    grads = {}
    for step in range(1, STEPS + 1):
        method.on_step_start(step - 1, TOTAL_STEPS, STEPS_PER_EPOCH)
        rec["teacher_temp"].append(method.teacher_temp.detach().clone())
        out, ok = train_step(method, views(step, name), optimizer, scaler, LR, CLIP, None,
                             weight_decay=WEIGHT_DECAY[step - 1], clip_mode="per_parameter",
                             epoch=(step - 1) // STEPS_PER_EPOCH)
        assert bool(ok), f"step {step} was skipped"
        if step in (1, STEPS):
            grads.update({f"step{step}.{n}": p.grad.detach().clone()
                          for n, p in method.named_parameters() if p.grad is not None})
        logs = method.on_step_end(step, TOTAL_STEPS, apply=ok)
        for k in stats(name):
            rec[k].append(out[k].detach())
        rec["momentum"].append(torch.tensor(logs["momentum"], dtype=torch.float64))
    rec = {k: torch.stack(v) for k, v in rec.items()}
    rec["grads"] = grads
    rec["final"] = state(method)
    return rec


def record(name: str) -> dict:
    return record_in_float64(lambda: build(name), lambda method: run(method, name), {"variant": name})


def main(names: list[str]) -> int:
    """Records the named variants (all without names)."""
    for name in names or VARIANTS:
        write_golden(golden_path(name), record(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
