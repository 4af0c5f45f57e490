"""Check `mobyssl export --format openmmlab` against OpenMMLab's own converters.

mmdet and mmseg do not import without mmcv's compiled ops, so their classes cannot be built here. Their weight
converters are plain functions, though: mmdet 3's ``swin_converter`` (``mmdet/models/backbones/swin.py``: the
original Swin layout -> its ``SwinTransformer``) and mmseg 1's ``convert_vit``
(``tools/model_converters/vit2mmseg.py``: timm's ViT -> its ``VisionTransformer``). This script reads their source
from an installed copy (``pip install --no-deps mmdet mmsegmentation`` into any folder), runs them on our
backbones' weights, and compares every key and tensor with what ``to_openmmlab`` writes.

    python benchmarks/check_openmmlab_layouts.py --site /tmp/mmenv/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import ast
from collections import OrderedDict
from pathlib import Path

import torch

from mobyssl.build import build_backbone
from mobyssl.config import load_config
from mobyssl.models.layouts import timm_to_original_swin, to_openmmlab


def load_function(path: Path, name: str):
    """The function ``name`` defined at the top level of ``path``, executed on its own."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"OrderedDict": OrderedDict, "torch": torch}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace[name]


def compare(ours: dict, theirs: dict) -> tuple[list, list, list]:
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    differ = sorted(k for k in set(ours) & set(theirs) if not torch.equal(ours[k], theirs[k]))
    return only_ours, only_theirs, differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", required=True, help="a site-packages folder holding mmdet and mmseg")
    args = p.parse_args()
    site = Path(args.site)
    swin_converter = load_function(site / "mmdet/models/backbones/swin.py", "swin_converter")
    convert_vit = load_function(site / "mmseg/.mim/tools/model_converters/vit2mmseg.py", "convert_vit")

    cases = [
        ("Swin (esvit_quickstart's 4-stage Swin)", "esvit_quickstart", []),
        ("Swin-T at 224 px", "moby_swin_tiny_in1k", []),
        ("ViT (quickstart's 0.8M ViT)", "quickstart", []),
        ("DeiT-S at 224 px", "moby_deit_small_in1k", []),
    ]
    failed = False
    for title, recipe, overrides in cases:
        cfg = load_config(recipe, overrides)
        torch.manual_seed(0)
        net = build_backbone(cfg)
        sd = net.state_dict()
        ours = to_openmmlab(net, sd)["state_dict"]
        if "swin" in cfg.model.backbone:
            theirs = dict(swin_converter(timm_to_original_swin(sd)))
        else:
            theirs = dict(convert_vit(sd))
        only_ours, only_theirs, differ = compare(ours, theirs)
        print(f"{title}: {len(ours)} tensors; only ours {only_ours}; only theirs {only_theirs}; "
              f"different values {differ}")
        # The one intended difference: the final norm is written as the last stage's output norm (norm<N>),
        # which mmdet / mmseg's Swin has, instead of 'norm', which it lacks and would drop.
        allowed_ours = [k for k in only_ours if k.startswith("backbone.norm") and k[len("backbone.norm")].isdigit()]
        allowed_theirs = [k for k in only_theirs if k.startswith("backbone.norm.")]
        if differ or set(only_ours) - set(allowed_ours) or set(only_theirs) - set(allowed_theirs):
            failed = True
            continue
        for ok, tk in zip(sorted(allowed_ours), sorted(allowed_theirs)):
            if not torch.equal(ours[ok], theirs[tk]):
                failed = True
    print("FAILED" if failed else "all equal (but the final norm's name, see above)")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
