"""Records the float64 golden trajectory of today's MoBY that ``tests/methods/test_moby_golden.py`` checks.

Run it ONLY deliberately, when MoBY's math changes on purpose::

    python tests/methods/golden/make_golden.py

then say in the commit message what changed in the math and why the new numbers are right. Never re-record
to make a failing golden test pass after a refactor (a port onto a new method contract, a config rewrite):
such a change must reproduce these numbers.

What is recorded, per backbone (``moby_swin.pt``: a Swin with MoBY's BatchNorm before the MLP, whose
target BatchNorm statistics are part of the state; ``moby_vit.pt``: a ViT with LayerNorms):

* ``init``: the method's state_dict right after construction under ``torch.manual_seed(SEED)``;
* ``loss``, ``pos_sim``, ``neg_sim``, ``feature_std``, ``momentum``: per step, 3 optimizer steps;
* ``grads``: the gradient of every parameter that has one after step 1 (after unscaling by the constant
  scale 1 and clipping at ``CLIP``);
* ``final``: the state_dict of the whole method after step 3 and its ``on_step_end`` (online and target
  weights, heads, BatchNorm statistics, both queues and their pointers).

Everything is float64, built without the config system (``MoBY(...)`` and ``create_backbone`` with plain
timm model names and explicit arguments, no presets), with drop path off (its random draws would tie the
numbers to the order of the forward passes) and trained through the real ``train_step`` (AdamW from
``build_adamw``, fixed lr, clip 5.0, the GradScaler of ``make_scaler``, no autocast) followed by
``method.on_step_end(step, TOTAL_STEPS, apply=ok)``, as the trainer does. The lr is small (1e-4) so that AdamW's
amplification of rounding noise stays well under the test's tolerance (see test_moby_golden.py). The numbers
depend on timm's model code too (recorded with the versions in ``meta``). Each file must stay under 1 MB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

from mobyssl.methods import MoBY
from mobyssl.models import create_backbone
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import make_scaler, train_step

HERE = Path(__file__).resolve().parent
SEED = 0
BATCH, IMAGE, STEPS, TOTAL_STEPS = 8, 16, 3, 10
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-4, 0.05, (0.9, 0.999), 5.0
HEADS = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=16, temperature=0.2, momentum=0.9)
BACKBONES = {
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=IMAGE, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                  norm_before_mlp="bn")),
    "vit": ("vit_tiny_patch16_224",
            dict(img_size=IMAGE, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)),
}
STATS = ("loss", "pos_sim", "neg_sim", "feature_std")


def golden_path(name: str) -> Path:
    return HERE / f"moby_{name}.pt"


def write_golden(path: Path, recorded: dict) -> None:
    """Save a recorded trajectory (every recorder's last step) and say where and how large."""
    torch.save(recorded, path)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


def build(name: str) -> MoBY:
    """The method under ``torch.manual_seed(SEED)``; call with float64 as the default dtype."""
    timm_name, kwargs = BACKBONES[name]
    torch.manual_seed(SEED)
    return MoBY(lambda dpr: create_backbone(timm_name, drop_path_rate=dpr, **kwargs),
                drop_path_rate=0.0, target_drop_path_rate=0.0, **HEADS)


def views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return list(torch.randn(2, BATCH, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64).unbind(0))


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def record_steps(method, steps: int, total_steps: int, take_step, stats) -> dict:
    """``take_step(step) -> (outputs, ok)`` (one ``train_step``), then ``on_step_end(step, total_steps)``, for steps 1
    to ``steps``; returns the per-step ``stats`` and momentum (stacked), ``grads`` (every gradient after step 1) and
    ``final`` (the state after the last step)."""
    rec: dict = {k: [] for k in (*stats, "momentum")}
    grads = {}
    for step in range(1, steps + 1):
        out, ok = take_step(step)
        assert bool(ok), f"step {step} was skipped"
        if step == 1:
            grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
        logs = method.on_step_end(step, total_steps, apply=ok)
        for k in stats:
            rec[k].append(out[k].detach())
        rec["momentum"].append(torch.tensor(logs["momentum"], dtype=torch.float64))
    rec = {k: torch.stack(v) for k, v in rec.items()}
    rec["grads"] = grads
    rec["final"] = state(method)
    return rec


def run(method: MoBY) -> dict:
    """``STEPS`` optimizer steps of ``method`` as the trainer takes them; returns what is recorded."""
    cpu = torch.device("cpu")
    method.train()
    optimizer = build_adamw(method.trainable_modules(), LR, WEIGHT_DECAY, BETAS, cpu)
    scaler = make_scaler(cpu, None)
    return record_steps(method, STEPS, TOTAL_STEPS,
                        lambda step: train_step(method, views(step), optimizer, scaler, LR, CLIP, None), STATS)


def record_in_float64(build_method, run_method, meta: dict) -> dict:
    """Build a method and run it with float64 as the default dtype; the golden file's content: ``meta`` (with
    the torch and timm versions), ``init`` (the state after construction) and what ``run_method`` records."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        method = build_method()
        init = state(method)
        rec = run_method(method)
    finally:
        torch.set_default_dtype(default)
    meta = {**meta, "torch": str(torch.__version__), "timm": str(timm.__version__)}
    return {"meta": meta, "init": init, **rec}


def record(name: str) -> dict:
    return record_in_float64(lambda: build(name), run, {"backbone": name})


def main() -> int:
    for name in BACKBONES:
        write_golden(golden_path(name), record(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
