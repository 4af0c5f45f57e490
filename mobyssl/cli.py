"""The ``mobyssl`` command line.

One error boundary (``main``): expected failures (``MobysslError``: config, data, checkpoint, output paths;
file-system errors; running out of memory) are printed as one line naming the key or file and the fix, with
exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path

from . import __version__

EVAL_COMMANDS = ("knn", "linear", "fewshot", "correspondence")

EXAMPLES = {
    "pretrain": """\
examples:
  mobyssl pretrain                                  # quickstart: tiny ViT on the bundled CIFAR-10 sample
  mobyssl pretrain --config moby_swin_tiny_in1k data.train=/data/imagenet/train data.test=/data/imagenet/val
  mobyssl pretrain --config moby_swin_tiny_in1k train.epochs=100 train.batch_size=256 --print-config
  mobyssl pretrain --config my_recipe.yaml output_dir=runs/exp1 --dry-run   # check everything, train nothing
  mobyssl pretrain output_dir=runs/exp1 --resume    # continue a run with its own config
  mobyssl pretrain output_dir=runs/exp1 --resume train.epochs=600 --accept-changes   # train it longer
""",
    "knn": """\
examples:
  mobyssl knn --checkpoint runs/quickstart/checkpoint.pth
  mobyssl knn --checkpoint ckpt.pth data.eval_train=/data/train data.test=/data/val knn.k=[10,20]
  mobyssl knn --config quickstart --random-init      # baseline: an untrained backbone
""",
    "linear": """\
examples:
  mobyssl linear --checkpoint runs/quickstart/checkpoint.pth linear.mode=fast
  mobyssl linear --checkpoint ckpt.pth data.eval_train=/data/imagenet/train data.test=/data/imagenet/val
""",
    "fewshot": """\
examples:
  mobyssl fewshot --checkpoint runs/quickstart/checkpoint.pth            # N = 1, 5, 10, 25; 5 draws each
  mobyssl fewshot --checkpoint ckpt.pth fewshot.shots=[1,5] fewshot.trials=10 --output fewshot.json
  mobyssl fewshot --config quickstart --random-init                       # baseline: an untrained backbone
""",
    "finetune": """\
examples:
  mobyssl finetune --checkpoint runs/quickstart/checkpoint.pth      # -> runs/quickstart/finetune (30 epochs)
  mobyssl finetune --config quickstart --random-init finetune.epochs=30             # the baseline from scratch
  mobyssl finetune --checkpoint ckpt.pth data.eval_train=/data/train data.test=/data/val finetune.layer_decay=0.65
  mobyssl finetune --checkpoint runs/quickstart/checkpoint.pth --resume      # after a stop
""",
    "visualize": """\
examples:
  mobyssl visualize --checkpoint runs/quickstart/checkpoint.pth --out pictures   # 8 test images, attention, PCA
  mobyssl visualize --run runs/quickstart --out pictures --k 5    # + training curves, 5 nearest neighbours each
  mobyssl visualize --checkpoint ckpt.pth --images cat.jpg dog.png --threshold 0.6 --out pictures
""",
    "correspondence": """\
examples:
  mobyssl correspondence --checkpoint runs/esvit/checkpoint.pth            # EsViT's view 2, top 10 pairs
  mobyssl correspondence --checkpoint ckpt.pth correspondence.top_k=4 correspondence.grayscale=false
  mobyssl correspondence --config esvit_quickstart --random-init correspondence.top_k=4
""",
}


def _config_help() -> str:
    from .config import METHOD_OPTIONS, Config, describe_constraint, iter_field_infos, method_names

    lines = ["config keys (set with key=value; values are YAML):"]

    def add(key, default, info):
        bounds = describe_constraint(info)
        lines.append(f"  {key} = {json.dumps(default)}" + (f"   ({bounds})" if bounds else ""))
        for chunk in textwrap.wrap(info.description or "", 90):
            lines.append(f"      {chunk}")

    for key, default, info in iter_field_infos():
        if not key.startswith("method."):
            add(key, default, info)
    for name in method_names():
        lines.append(f"method.* keys of method.name={name}:")
        for key, default, info in iter_field_infos(Config(method=METHOD_OPTIONS[name]())):
            if key.startswith("method."):
                add(key, default, info)
    return "\n".join(lines)


def _add_common(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help=f"recipe name (see `mobyssl recipes`) or path to a YAML file (default: {default_help})")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the data, the model and the output paths, then exit without work")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.epochs=100 data.train=/data/train")


def _add_backbone_command(sub, name: str, desc: str, checkpoint_use: str, random_help: str):
    """A subcommand about one backbone: --checkpoint PATH or --random-init, plus the common options."""
    p = sub.add_parser(name, help=desc.replace("%", "%%"), description=desc,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES[name] + "\n" + _config_help())
    _add_common(p, "the config stored in --checkpoint; quickstart with --random-init")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", metavar="PATH",
                       help=f"pre-training checkpoint (or exported backbone) {checkpoint_use}")
    which.add_argument("--random-init", action="store_true", help=random_help)
    return p


def make_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mobyssl", formatter_class=fmt,
        description="Self-supervised pre-training of vision transformers (MoBY with Swin / DeiT backbones), "
                    "with k-NN and linear evaluation.")
    parser.add_argument("--version", action="version", version=f"mobyssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("pretrain", help="self-supervised pre-training", formatter_class=fmt,
                       description="Pre-train a backbone. Writes config.yaml, metrics.jsonl, tensorboard/ and "
                                   "checkpoints into output_dir, which must be new or empty for a new run.",
                       epilog=EXAMPLES["pretrain"] + "\n" + _config_help())
    _add_common(p, "quickstart; with --resume, the config stored in the checkpoint")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in output_dir that loads (broken ones are reported and "
                        "skipped), or from the given checkpoint file. Without --config the checkpoint's own config "
                        "is used (overrides apply on top)")
    p.add_argument("--accept-changes", action="store_true",
                   help="with --resume: continue although the config differs from the checkpoint's in keys that "
                        "change the run (e.g. train.epochs, train.lr); they are listed either way")

    for name, desc in (("knn", "weighted k-NN evaluation of a frozen backbone (DINO protocol)"),
                       ("linear", "linear probe of a frozen backbone (paper protocol, or linear.mode=fast)"),
                       ("fewshot", "N-shot logistic regression on frozen features: mean top-1 and 95% interval "
                                   "per N over seeded draws (fewshot.*)"),
                       ("correspondence", "EsViT's dense correspondence: each token of a test image matched to "
                                          "its mirrored, colour-jittered grey copy (correspondence.*)")):
        p = _add_backbone_command(sub, name, desc, "whose backbone is evaluated",
                                  "evaluate a randomly initialised backbone as a baseline (architecture from "
                                  "--config, default quickstart)")
        p.add_argument("--output", metavar="JSON", help="also write the results to this JSON file")

    desc = ("end-to-end supervised fine-tuning of a backbone with a new linear head (MAE / BEiT recipe: layer-wise "
            "lr decay, RandAugment, mixup / CutMix, label smoothing); top-1 on data.test after every epoch")
    p = _add_backbone_command(sub, "finetune", desc, "to start from",
                              "start from a randomly initialised backbone (the baseline)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in finetune.output_dir from "
                   "its newest checkpoint (same command otherwise)")

    desc = ("pictures of a backbone: the last block's CLS attention per head (ViTs), the first three principal "
            "components of its token features as colours, nearest neighbours, and a run's training curves")
    p = _add_backbone_command(sub, "visualize", desc, "to draw", "draw a randomly initialised backbone")
    # Under torchrun write --run-dir and --number: torchrun's own parser takes --run and --num as abbreviations of
    # its --run-path and --numa-binding, even after the module name.
    p.add_argument("--run", "--run-dir", dest="run", metavar="DIR", help="a pre-training run folder: draws its "
                   "training curves (metrics.jsonl) and, without --checkpoint, its newest checkpoint (--run-dir "
                   "under torchrun)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder for the PNG files")
    p.add_argument("--images", nargs="+", metavar="PATH", help="image files to draw (default: the first --num "
                   "images of data.test)")
    p.add_argument("--num", "--number", dest="num", type=int, default=8, metavar="N",
                   help="images of data.test to draw (default: 8; --number under torchrun)")
    p.add_argument("--k", type=int, default=0, metavar="K", help="also a retrieval grid: each image's K nearest "
                   "neighbours in data.eval_train (or data.train), by cosine similarity of the pooled features")
    p.add_argument("--threshold", type=float, metavar="T", help="also masks keeping the patches that hold "
                   "fraction T of each head's attention (DINO uses 0.6)")

    p = sub.add_parser("export", help="write the backbone's weights for timm, torchvision or the authors' code",
                       description="Extract the online backbone from a pre-training checkpoint as a plain "
                                   "state dict that timm.create_model(..., num_classes=0) loads. Never writes over "
                                   "a training checkpoint; writes atomically.")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--output", required=True, metavar="PATH", help="e.g. backbone.pth")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file (never a training checkpoint)")
    p.add_argument("--format", default="timm", choices=["timm", "torchvision", "openmmlab", "mmdet", "mmseg",
                                                        "official"],
                   help="key layout: timm (default; timm.create_model(..., num_classes=0) loads it), torchvision "
                        "(its VisionTransformer / SwinTransformer of the same shape), openmmlab (mmdet 3 / mmseg 1 "
                        "SwinTransformer, mmseg 1 VisionTransformer; mmdet and mmseg are other names for it: point "
                        "the backbone's init_cfg=dict(type='Pretrained', checkpoint=...) at the file), or official "
                        "(the authors' layout in a {'model': ...} file: the original Swin layout that the MoBY "
                        "authors' detection and segmentation code loads; DeiT's, i.e. timm's, for ViTs)")

    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("backbones", help="list small-image presets and backbone aliases")
    sub.add_parser("methods", help="list the self-supervised methods")
    sub.add_parser("config-schema", help="print the JSON schema of recipe files (for editors)")
    return parser


# --------------------------------------------------------------------------- commands


def _eval_config(args, state: dict | None):
    """--config (recipe + overrides), else the checkpoint's stored config + overrides, else quickstart."""
    from .config import config_with_overrides, load_config
    from .errors import CheckpointError

    notices: list[str] = []
    if args.config or state is None:
        cfg = load_config(args.config or "quickstart", args.overrides, notices)
        _print_notices(notices)
        return cfg
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{args.checkpoint} stores no config (an exported backbone?); pass --config with the "
                              "recipe it was trained with, plus the overrides that set its model and image size")
    cfg = config_with_overrides(copy.deepcopy(saved), args.overrides, notices)
    _print_notices(notices)
    return cfg


def _print_notices(notices: list[str]) -> None:
    for notice in notices:
        print(f"mobyssl: note: {notice}", file=sys.stderr)


def _cmd_pretrain(args) -> int:
    from .config import Config, apply_overrides, from_dict, load_config, to_yaml
    from .errors import ConfigError
    from .train.trainer import find_resume_point, pretrain

    if args.accept_changes and not args.resume:
        raise ConfigError("--accept-changes only applies with --resume")
    point = None
    if args.resume and not args.config:
        # The run's own config continues it; output_dir comes from the overrides (or the default).
        out = load_config("quickstart", [o for o in args.overrides if o.split("=", 1)[0].strip() == "output_dir"])
        point = find_resume_point(out.output_dir, args.resume)
        cfg = from_dict(Config, apply_overrides(point.config(), args.overrides))
    else:
        notices: list[str] = []
        cfg = load_config(args.config or "quickstart", args.overrides, notices)
        _print_notices(notices)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    result = pretrain(cfg, resume=point or args.resume, accept_changes=args.accept_changes, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run: config, data, model and output_dir={cfg.output_dir} checked; nothing was written "
              f"({result['steps_per_epoch']} steps/epoch x {cfg.train.epochs} epochs)")
    return 0


def _evaluated_network(cfg: dict) -> str:
    """The network of a pre-training checkpoint that evaluations read, in words: "moby encoder", "dino teacher"."""
    from .errors import ConfigError
    from .methods import get_method

    name = cfg.get("method", {}).get("name", "?")
    try:
        key = get_method(name).backbone_key
    except ConfigError:  # an unknown method name: the layout check that follows names the problem
        return f"{name} method"
    return f"{name} {'online encoder' if key == 'encoder' else key}"


def _describe_checkpoint(state: dict, path: str) -> str:
    """Which network a report is about: the file, its step and architecture."""
    from .models.layouts import published_backbone

    published = published_backbone(state)
    if published is not None:
        return f"checkpoint {path} ({published[1]})"
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    backbone = cfg.get("model", {}).get("backbone")
    parts = [f"step {state['global_step']}" if "global_step" in state else "an exported backbone",
             _evaluated_network(cfg) if "method" in state else None, backbone]
    return f"checkpoint {path} ({', '.join(p for p in parts if p)})"


def _load_backbone(args, for_finetune: bool = False):
    """The backbone an evaluation command is about: ``--checkpoint`` (its stored config unless ``--config``) or
    ``--random-init``. Returns ``(cfg, backbone, description, device, amp_dtype)``, or None after --print-config."""
    from .build import build_backbone
    from .distributed import init_distributed
    from .runtime import resolve_amp, resolve_device, seed_everything
    from .train.checkpoint import backbone_state_dict, load_backbone_weights, load_checkpoint
    from .train.compat import check_backbone_fits

    state = load_checkpoint(args.checkpoint) if args.checkpoint else None
    cfg = _eval_config(args, state)
    if args.print_config:
        from .config import to_yaml

        print(to_yaml(cfg), end="")
        return None
    if state is not None:
        check_backbone_fits(state.get("config"), cfg, args.checkpoint)
    seed_everything(cfg.train.seed)
    device = init_distributed(resolve_device(cfg.train.device))
    amp_dtype = resolve_amp(cfg.train.amp, device)
    backbone = build_backbone(cfg, drop_path_rate=cfg.finetune.drop_path if for_finetune else 0.0)
    if state is not None:
        load_backbone_weights(backbone, backbone_state_dict(state, args.checkpoint), args.checkpoint)
        model = _describe_checkpoint(state, args.checkpoint)
    else:
        model = f"random init ({cfg.model.backbone}, train.seed={cfg.train.seed})"
    return cfg, backbone, model, device, amp_dtype


def _cmd_eval(args) -> int:
    from .build import build_eval_datasets
    from .distributed import is_main_process
    from .errors import ConfigError
    from .eval.runner import (
        check_correspondence_top_k,
        check_fewshot_shots,
        run_correspondence,
        run_fewshot,
        run_knn,
        run_linear,
    )
    from .models.last_blocks import check_last_blocks
    from .train.rundir import check_output_file

    if not args.checkpoint and not args.random_init:
        raise ConfigError("pass --checkpoint PATH (or --random-init with --config for an untrained baseline)")
    output = check_output_file(args.output, "--output") if args.output else None
    if output is not None and output.exists() and not _is_results_file(output):
        from .errors import RunDirError

        raise RunDirError(f"--output {output} exists and is not a results file written by mobyssl; choose another "
                          "file name (nothing was overwritten)")
    loaded = _load_backbone(args)
    if loaded is None:
        return 0
    cfg, backbone, model, device, amp_dtype = loaded
    if args.command == "linear":
        check_last_blocks(backbone, cfg.linear.n_last_blocks)
    if args.command == "correspondence":
        check_correspondence_top_k(backbone, cfg)
    datasets = build_eval_datasets(cfg)  # before any work: bad paths and labels fail here
    if args.command == "fewshot":
        check_fewshot_shots(cfg, datasets[0])
    if args.dry_run:
        print(f"dry run: {model}; config and data checked; nothing evaluated")
        return 0
    backbone.to(device)
    if is_main_process():
        print(f"evaluating {model}", flush=True)
    if args.command == "knn":
        results = run_knn(cfg, backbone, device, amp_dtype, datasets)
    elif args.command == "fewshot":
        results = run_fewshot(cfg, backbone, device, amp_dtype, datasets)
    elif args.command == "correspondence":
        results = run_correspondence(cfg, backbone, device, amp_dtype, datasets)
    else:
        results = run_linear(cfg, backbone, device, amp_dtype)
    if not is_main_process():
        return 0
    if args.command == "fewshot":
        print(_fewshot_table(results, cfg.fewshot.trials))
    else:
        for k, v in results.items():
            print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    if output is not None:
        # A value that is not a number (a 95% interval over one draw) is written as null: strict JSON has no NaN.
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in results.items()}
        _write_atomic(output, json.dumps({**finite, "model": model, "command": args.command}, indent=2) + "\n")
        print(f"wrote {output}")
    return 0


def _fewshot_table(results: dict, trials: int) -> str:
    """The few-shot results as a table: one row per N, mean top-1 and the 95% interval over the draws."""
    rows = [f"N-shot top-1 (%), mean over {trials} draw{'s' if trials > 1 else ''} with its 95% interval:",
            "    N   top-1   95% interval"]
    for key, top1 in results.items():
        if key.startswith("fewshot_top1_"):
            n = key.removeprefix("fewshot_top1_").removesuffix("shot")
            ci = results[f"fewshot_ci95_{n}shot"]
            interval = f"± {ci:.2f}" if math.isfinite(ci) else "(one draw: none)"
            rows.append(f"{n:>5}  {top1:6.2f}   {interval}")
    return "\n".join(rows)


def _is_results_file(path: Path) -> bool:
    """A JSON file an earlier ``mobyssl knn/linear --output`` wrote (safe to replace)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("command") in EVAL_COMMANDS


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cmd_finetune(args) -> int:
    from .errors import ConfigError
    from .train.finetune import default_output_dir, finetune

    if not args.checkpoint and not args.random_init:
        raise ConfigError("pass --checkpoint PATH (or --random-init with --config for the from-scratch baseline)")
    loaded = _load_backbone(args, for_finetune=True)
    if loaded is None:
        return 0
    cfg, backbone, model, device, amp_dtype = loaded
    out = Path(cfg.finetune.output_dir) if cfg.finetune.output_dir else default_output_dir(args.checkpoint)
    result = finetune(cfg, backbone, out, device, amp_dtype, resume=args.resume, dry_run=args.dry_run, source=model)
    if args.dry_run:
        print(f"dry run: {model}; config, data and {out} checked; nothing trained "
              f"({result['steps_per_epoch']} steps/epoch x {cfg.finetune.epochs} epochs)")
    elif result.get("top1") is not None:
        print(f"done: {model} fine-tuned {cfg.finetune.epochs} epochs: top-1 {result['top1']:.2f}, top-5 "
              f"{result['top5']:.2f} on data.test; checkpoints and metrics.jsonl in {out}")
    return 0


def _cmd_visualize(args) -> int:
    import torch

    from .data import eval_transform, open_dataset
    from .distributed import is_main_process
    from .errors import ConfigError, RunDirError
    from .eval.runner import load_images, run_visualize
    from .eval.visualize import read_metrics, save_training_curves

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out {out} exists and is not an empty folder; choose a new folder (nothing was written)")
    if args.num < 1 or args.k < 0 or (args.threshold is not None and not 0 < args.threshold <= 1):
        raise ConfigError("--num must be at least 1, --k at least 0 and --threshold in (0, 1]; got "
                          f"--num {args.num}, --k {args.k}, --threshold {args.threshold}")
    if args.run:
        read_metrics(args.run)  # a missing or empty metrics.jsonl fails here, before any work
        if not args.checkpoint and not args.random_init and (Path(args.run) / "checkpoint.pth").exists():
            args.checkpoint = str(Path(args.run) / "checkpoint.pth")
    elif not args.checkpoint and not args.random_init:
        raise ConfigError("pass --checkpoint PATH, --run DIR or --random-init (with --config) to say what to draw")
    loaded = _load_backbone(args) if args.checkpoint or args.random_init else None
    if loaded is None and args.print_config:
        return 0
    images = labels = names = class_names = None
    if loaded is not None:
        cfg, backbone, model, device, amp_dtype = loaded
        if args.images:
            images, names = load_images(args.images, cfg), [Path(p).stem for p in args.images]
        else:
            test = open_dataset(cfg.data.test, eval_transform(cfg.data.image_size, 1.0, cfg.data.normalization),
                                key="data.test")
            picked = range(min(args.num, len(test)))
            images = torch.stack([test[i][0] for i in picked])
            labels = torch.tensor([test[i][1] for i in picked])
            names, class_names = [f"test{i:04d}" for i in picked], test.classes or None
    if args.dry_run:
        print(f"dry run: {model if loaded else 'no backbone'}; config, images and --out checked; nothing drawn")
        return 0
    if not is_main_process():
        return 0
    written = []
    if loaded is not None:
        print(f"drawing {model}", flush=True)
        backbone.to(device)
        written += run_visualize(cfg, backbone, device, amp_dtype, images, names, out, labels, class_names, args.k,
                                 args.threshold)
    if args.run:
        written.append(save_training_curves(args.run, out / "curves.png"))
    print(f"wrote {len(written)} files in {out}")
    return 0


OPENMMLAB_NAMES = {"mmdet": "openmmlab", "mmseg": "openmmlab"}  # one layout serves both


def _cmd_export(args) -> int:
    from .errors import CheckpointError
    from .models.backbones import timm_call
    from .train.checkpoint import backbone_state_dict, check_export_target, check_finite, load_checkpoint, save_export

    fmt = OPENMMLAB_NAMES.get(args.format, args.format)

    output = check_export_target(args.output, args.checkpoint, args.overwrite)  # before any work
    recipe = check_export_target(output.with_suffix(".json"), args.checkpoint, args.overwrite, "--output's .json")
    state = load_checkpoint(args.checkpoint)
    sd = backbone_state_dict(state, args.checkpoint)
    check_finite(sd, args.checkpoint)
    cfg = state.get("config") or {}
    model = cfg.get("model", {})
    call = None
    # How the stored config builds the backbone (create_backbone's arguments), for timm's call and for conversions.
    arch = {"img_size": cfg.get("data", {}).get("image_size"), "norm_before_mlp": model.get("norm_before_mlp", "ln"),
            **(model.get("kwargs") or {})}
    if model.get("backbone"):
        call = timm_call(model["backbone"], **arch)
    elif fmt != "timm":
        raise CheckpointError(f"{args.checkpoint} stores no config, so its architecture is unknown and --format "
                              f"{fmt} cannot be written; use --format timm")
    written, load = sd, None
    if fmt != "timm":
        written, load = _convert_export(fmt, model["backbone"], arch, sd, args.checkpoint, output)
    save_export(written, output, source_checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {len(sd)} backbone tensors to {output} ({fmt} layout; backbone {model.get('backbone', '?')})")
    if call is None:
        print("the checkpoint stores no config, so the call that rebuilds its architecture is unknown")
        return 0
    if load is None:
        imports = "import functools, timm, torch" + (", mobyssl.models.backbones" if "mobyssl." in call["code"] else "")
        load = (f"{imports}\nmodel = {call['code']}\n"
                f"model.load_state_dict(torch.load({str(output)!r}, map_location='cpu'))")
    _write_atomic(recipe, json.dumps({"backbone": model["backbone"], "format": fmt, "timm_name": call["timm_name"],
                                      "timm_kwargs": call["kwargs"], "load": load, "weights": output.name,
                                      "source_checkpoint": str(args.checkpoint), "step": state.get("global_step"),
                                      "method": cfg.get("method", {}).get("name")}, indent=2, default=str) + "\n")
    print(f"rebuild and load it with (also in {recipe}):\n{textwrap.indent(load, '    ')}")
    return 0


def _convert_export(fmt: str, backbone: str, arch: dict, sd: dict, checkpoint, output) -> tuple[dict, str | None]:
    """The backbone (``create_backbone(backbone, **arch)`` holding ``sd``) in ``fmt``'s layout and, where a Python
    class loads it, the lines that do."""
    from .errors import ConfigError
    from .models.backbones import create_backbone
    from .models.layouts import ExportError, to_openmmlab, to_original, to_torchvision
    from .train.checkpoint import load_backbone_weights

    net = create_backbone(backbone, **arch)
    load_backbone_weights(net, sd, str(checkpoint))
    try:
        if fmt == "openmmlab":
            return to_openmmlab(net, net.state_dict()), (
                "# OpenMMLab's layout in a {'state_dict': ...} file: in an mmdet 3 / mmseg 1 config, set the "
                "backbone's\n# init_cfg=dict(type='Pretrained', checkpoint=<this file>) (Swin: convert_weights=False, "
                "the default).")
        if fmt == "official":
            return to_original(net, net.state_dict()), (
                "# The authors' layout in a {'model': state dict} file, as their released weights: give the file to "
                "their code\n# (e.g. pretrained= of a Swin backbone in the Swin / MoBY detection and segmentation "
                "code); timm and\n# torchvision load --format timm and --format torchvision.")
        converted, code, after = to_torchvision(net, net.state_dict())
    except ExportError as e:
        raise ConfigError(str(e)) from None
    load = (f"import functools, torch, torchvision\nmodel = {code}\n{after}\n"
            f"model.load_state_dict(torch.load({str(output)!r}, map_location='cpu'))")
    return converted, load


def _cmd_list(args) -> int:
    if args.command == "recipes":
        from .config import list_recipes, resolve_recipe

        for name in list_recipes():
            first = resolve_recipe(name).read_text().splitlines()[0].lstrip("# ")
            print(f"{name:28s} {first}")
    elif args.command == "backbones":
        from .models import ALIASES, PRESETS

        print("small-image presets:")
        for name, p in PRESETS.items():
            print(f"  {name:30s} {p.doc}")
        print("aliases (any other timm model name works too):")
        for name, target in ALIASES.items():
            print(f"  {name:30s} {target}")
    elif args.command == "config-schema":
        from .config import json_schema

        print(json.dumps(json_schema(), indent=2))
    else:
        from .methods import METHODS

        for name, cls in METHODS.items():
            print(f"{name:10s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


# --------------------------------------------------------------------------- the error boundary

_WORKER_WRAPPED = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def user_message(e: BaseException) -> str:
    """The one-line message of an expected failure: a DataLoader worker's traceback is reduced to its cause."""
    text = str(e)
    if _WORKER_WRAPPED.search(text):
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(text.split("\n")).strip()


def _os_message(e: OSError) -> str:
    where = " ".join(str(f) for f in (e.filename, e.filename2) if f)
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Overrides may come anywhere, also after options (``--resume train.epochs=600``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv[:-1]):
        following = argv[i + 1]
        if token == "--resume" and "=" in following and not following.startswith("-") and not Path(following).exists():
            argv[i] = "--resume="  # `--resume key=value`: the value is an override, not a checkpoint path
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        command = parser._subparsers._group_actions[0].choices.get(args.command) if args.command else None
        (command or parser).error(f"unrecognized arguments: {' '.join(stray or extra)}{_flag_hint(stray, args)}")
    if getattr(args, "resume", None) == "":
        args.resume = True
    if extra:  # overrides after options come after those before them: their order is kept
        args.overrides.extend(extra)
    return args


def _flag_hint(stray: list[str], args) -> str:
    """``--epochs 3`` is a config key written as a flag: say how keys are set."""
    from .config import iter_fields

    keys = [k for k, _, _ in iter_fields()]
    for arg in stray:
        name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        match = [k for k in keys if k == name or k.rsplit(".", 1)[-1] == name]
        if arg.startswith("-") and match:
            return f"; config keys are set as key=value without dashes, e.g. {match[0]}=..."
    return f"; see `mobyssl {args.command or ''} --help`".replace("  ", " ")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import MobysslError
    from .train.guards import TrainingInterrupted

    handlers = {"pretrain": _cmd_pretrain, "export": _cmd_export, "visualize": _cmd_visualize, "finetune": _cmd_finetune,
                **{name: _cmd_eval for name in EVAL_COMMANDS}}
    prefix = f"mobyssl {args.command}: error:"
    try:
        code = handlers.get(args.command, _cmd_list)(args)
        sys.stdout.flush()  # here, so that a closed pipe is handled below, not at interpreter exit
        return code
    except TrainingInterrupted as e:
        print(f"mobyssl {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except MobysslError as e:
        print(f"{prefix} {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: nothing more to say
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the file system said no: a full disk, permissions, a vanished file
        print(f"{prefix} {_os_message(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prefix} out of host memory; lower data.num_workers, train.batch_size or knn.batch_size",
              file=sys.stderr)
        return 2
    except RuntimeError as e:
        expected = _expected_runtime_error(e)
        if expected is None:
            raise
        print(f"{prefix} {expected}", file=sys.stderr)
        return 2
    finally:
        from .distributed import shutdown

        shutdown()


def _expected_runtime_error(e: RuntimeError) -> str | None:
    """Failures of the machine rather than of mobyssl: a data worker killed, the device out of memory."""
    import torch

    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return ("the device ran out of memory (" + text.splitlines()[0][:160] + "). Lower train.batch_size (the lr "
                "follows it), or raise train.accum_steps, or set train.grad_checkpointing=true; for evaluation lower "
                "knn.batch_size.")
    if "DataLoader worker" in text and ("killed" in text or "exited unexpectedly" in text):
        return (text.splitlines()[0][:200] + ". A data-loading worker died, usually of host memory: lower "
                "data.num_workers (0 loads in the main process and shows the error) or train.batch_size.")
    return None


if __name__ == "__main__":
    sys.exit(main())
