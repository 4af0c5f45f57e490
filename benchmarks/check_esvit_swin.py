"""mobyssl's multi-crop Swin against the official EsViT Swin: same weights, same crops, float64.

Needs a checkout of https://github.com/microsoft/esvit (not part of mobyssl; nothing is copied from it):

    python benchmarks/check_esvit_swin.py --esvit-repo /path/to/esvit

Builds the official ``models/swin_transformer.py`` ``SwinTransformer`` (LayerNorm eps 1e-6, as EsViT's) with
random weights, loads them into ``create_backbone(..., multi_size=True, layer_norm_eps=1e-6)`` through timm's
``checkpoint_filter_fn``, and prints, for the build size and smaller (local-crop) sizes, the relative difference
of the final tokens and the pooled feature; also for a stock timm Swin (``strict_img_size=False``) on the same
weights, which shifts its windows before padding them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from functools import partial
from pathlib import Path

import torch
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

from mobyssl.models import create_backbone, patch_tokens


def official_swin_module(repo: Path):
    """``models/swin_transformer.py`` of the EsViT checkout, imported without its package ``__init__`` (which
    pulls in every other architecture)."""
    package = types.ModuleType("esvit_models")
    package.__path__ = [str(repo / "models")]
    sys.modules["esvit_models"] = package
    return importlib.import_module("esvit_models.swin_transformer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--esvit-repo", type=Path, required=True)
    p.add_argument("--build-size", type=int, default=112)
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 96, 64, 48])
    args = p.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    arch = dict(img_size=args.build_size, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4],
                window_size=7)
    official = official_swin_module(args.esvit_repo).SwinTransformer(
        num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_dense_prediction=True, drop_path_rate=0.0,
        **arch).eval()
    with torch.no_grad():
        for param in official.parameters():  # every weight random, biases and norms too, so no term hides
            param.normal_(0, 0.2)
    timm_arch = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    ours = create_backbone("swin_tiny_patch4_window7_224", multi_size=True, layer_norm_eps=1e-6, **timm_arch).eval()
    stock = create_backbone("swin_tiny_patch4_window7_224", layer_norm_eps=1e-6, strict_img_size=False,
                            **timm_arch).eval()
    weights = checkpoint_filter_fn(official.state_dict(), ours)
    ours.load_state_dict(weights)
    stock.load_state_dict(weights)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print("| crop (px) | tokens | mobyssl vs official: tokens | pooled | stock timm vs official: tokens |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            pooled, region = official.forward_features(x)
            features = ours.forward_features(x)
            tokens = patch_tokens(ours, features)
            stock_tokens = patch_tokens(stock, stock.forward_features(x))
        print(f"| {size} | {tokens.shape[1]} | {rel(tokens, region):.1e} "
              f"| {rel(ours.forward_head(features, pre_logits=True), pooled.flatten(1)):.1e} "
              f"| {rel(stock_tokens, region):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
