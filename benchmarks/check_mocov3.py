"""mobyssl's MoCo v3 against the official code: same weights, same inputs, float64, several training steps.

Needs a checkout of https://github.com/facebookresearch/moco-v3 (not part of mobyssl; nothing is copied from it):

    python benchmarks/check_mocov3.py --mocov3-repo /path/to/moco-v3

Builds the official ``vits.VisionTransformerMoCo`` inside ``moco.builder.MoCo_ViT`` (stop-grad conv1 on) and the
golden-test MoCo v3 of ``tests/methods/golden/make_golden_mocov3.py``, compares the official sin-cos position table
with ours, loads the official weights into ours, then trains both for the golden run's steps on the same views:
the official loop (``main_moco.py``: AdamW over ``model.parameters()``, its lr and momentum formulas per
iteration, the momentum update inside the forward, before the keys) against mobyssl's ``train_step`` and
``on_step_end``. Prints the largest differences of the losses, the lrs, the momenta and the final weights. The
official code runs on CPU here: ``.cuda()`` is made a no-op and a one-process gloo group stands in for its GPUs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "methods" / "golden"))
import make_golden_mocov3 as golden  # noqa: E402

from mobyssl.train.optim import fused_adamw_on  # noqa: E402


def official_modules(repo: Path):
    """``vits`` and ``moco.builder`` of the checkout, on today's timm (it was written for timm 0.4.9)."""
    import timm.layers
    import timm.models.vision_transformer as tvit

    sys.modules.setdefault("timm.models.layers.helpers", timm.layers.helpers)
    tvit.VisionTransformer.num_tokens = 1  # timm 0.4.9's name for the number of prefix tokens (one class token)
    sys.path.insert(0, str(repo))
    import moco.builder
    import vits
    return vits, moco.builder


def official_lr(base: float, step: int, total: int, warmup: int) -> float:
    """``main_moco.adjust_learning_rate`` with one iteration per epoch (its ``t`` is then the iteration)."""
    if step < warmup:
        return base * step / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def official_momentum(base: float, step: int, total: int) -> float:
    """``main_moco.adjust_moco_momentum`` (``--moco-m-cos``), one iteration per epoch."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total)) * (1.0 - base)


def rename(official_key: str) -> str | None:
    """An official ``MoCo_ViT`` state-dict key -> mobyssl's ``MoCoV3`` key."""
    for side, encoder, projector in (("base_encoder.", "encoder.", "projector.net."),
                                     ("momentum_encoder.", "encoder_target.", "projector_target.net.")):
        if official_key.startswith(side + "head."):
            return projector + official_key[len(side + "head."):]
        if official_key.startswith(side):
            return encoder + official_key[len(side):]
    if official_key.startswith("predictor."):
        return "predictor.net." + official_key[len("predictor."):]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mocov3-repo", type=Path, required=True)
    p.add_argument("--exact-first-update", choices=["on", "off"], default="on")
    p.add_argument("--same-rounding", choices=["on", "off"], default="on")
    args = p.parse_args()
    args.exact_first_update = args.exact_first_update == "on"
    args.same_rounding = args.same_rounding == "on"
    vits, builder = official_modules(args.mocov3_repo)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official loss puts its labels on the GPU
    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    torch.set_default_dtype(torch.float64)
    timm_name, arch = golden.BACKBONE
    h = golden.HEADS
    vit = partial(vits.VisionTransformerMoCo, stop_grad_conv1=True, img_size=arch["img_size"],
                  patch_size=arch["patch_size"], embed_dim=arch["embed_dim"], depth=arch["depth"],
                  num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
    torch.manual_seed(1)
    official = builder.MoCo_ViT(vit, dim=h["proj_dim"], mlp_dim=h["proj_hidden_dim"], T=h["temperature"])
    ours = golden.build()

    table_diff = (ours.encoder.pos_embed - official.base_encoder.pos_embed).abs().max().item()
    frozen = [n for n, q in official.base_encoder.named_parameters() if not q.requires_grad]
    ours_frozen = [n for n, q in ours.encoder.named_parameters() if not q.requires_grad]
    print(f"sin-cos table: max |ours - official| = {table_diff:.3g}; frozen: official {frozen}, ours {ours_frozen}")

    weights = {rename(k): v for k, v in official.state_dict().items() if rename(k) is not None}
    missing = set(ours.state_dict()) - set(weights)
    assert not missing, f"not mapped: {sorted(missing)}"
    ours.load_state_dict(weights, strict=True)

    official.train()
    same_rounding = {}
    if args.same_rounding:
        # The same arithmetic as mobyssl's for the same math: the EMA as a lerp and AdamW's fused kernel (where this
        # PyTorch has it), so that the comparison is not blurred by rounding differences, which the BatchNorms of the
        # heads magnify (see --exact-first-update).
        def lerp_update(m):
            with torch.no_grad():
                torch._foreach_lerp_(list(official.momentum_encoder.parameters()),
                                     [q.detach() for q in official.base_encoder.parameters()], 1.0 - m)
        official._update_momentum_encoder = lerp_update
        same_rounding = {"fused": True} if fused_adamw_on("cpu") else {}
    optimizer = torch.optim.AdamW(official.parameters(), golden.LR, weight_decay=golden.WEIGHT_DECAY,
                                  betas=golden.BETAS, **same_rounding)
    losses, lrs, momenta = [], [], []
    for i in range(golden.STEPS):
        lr = official_lr(golden.LR, i, golden.TOTAL_STEPS, golden.WARMUP_STEPS)
        m = official_momentum(h["momentum"], i, golden.TOTAL_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = golden.views(i + 1)
        # At iteration 0 the key encoder is a copy of the online one, so its update is the identity: m * p +
        # (1 - m) * p. In floating point it moves p by an ulp, and the BatchNorms over 8 nearly equal class tokens
        # (random init) magnify that to ~1e-8 in the loss. m = 1 makes it exact, as mobyssl (no update before the
        # first step) has it. Run with --exact-first-update off to see the size of that rounding effect.
        loss = official(x1, x2, 1.0 if i == 0 and args.exact_first_update else m)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        lrs.append(lr)
        momenta.append(official_momentum(h["momentum"], i + 1, golden.TOTAL_STEPS))  # used at the next iteration
    # The official code updates the key encoder at the start of each iteration: one more update brings it to where
    # mobyssl's on_step_end leaves it after the last step.
    with torch.no_grad():
        official._update_momentum_encoder(momenta[-1])

    rec = golden.run(ours)
    mapped = {rename(k): v for k, v in official.state_dict().items() if rename(k) is not None}
    final_diff = max((rec["final"][k] - v).abs().max().item() for k, v in mapped.items() if v.is_floating_point())
    print(f"losses   official {[f'{x:.10f}' for x in losses]}")
    print(f"         mobyssl  {[f'{x:.10f}' for x in rec['loss'].tolist()]}")
    print(f"max |loss diff| {max(abs(a - b) for a, b in zip(losses, rec['loss'].tolist())):.3g}, "
          f"max |lr diff| {max(abs(a - b) for a, b in zip(lrs, rec['lr'].tolist())):.3g}, "
          f"max |momentum diff| {max(abs(a - b) for a, b in zip(momenta, rec['momentum'].tolist())):.3g}, "
          f"max |final state diff| {final_diff:.3g} (over {len(mapped)} tensors)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
