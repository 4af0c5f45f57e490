"""The ``mobyssl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from . import __version__

EXAMPLES = {
    "pretrain": """\
examples:
  mobyssl pretrain                                  # quickstart: tiny ViT on the bundled CIFAR-10 sample
  mobyssl pretrain --config moby_swin_tiny_in1k data.train=/data/imagenet/train data.test=/data/imagenet/val
  mobyssl pretrain --config moby_swin_tiny_in1k train.epochs=100 train.batch_size=256 --print-config
  mobyssl pretrain --config my_recipe.yaml output_dir=runs/exp1 --resume
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
}


def _config_help() -> str:
    from .config import iter_fields

    lines = ["config keys (set with key=value; values are YAML):"]
    for key, default, text in iter_fields():
        lines.append(f"  {key} = {json.dumps(default)}")
        for chunk in textwrap.wrap(text, 90):
            lines.append(f"      {chunk}")
    return "\n".join(lines)


def _add_common(p: argparse.ArgumentParser, default_recipe: str | None) -> None:
    p.add_argument("--config", default=default_recipe, metavar="RECIPE",
                   help="recipe name (see `mobyssl recipes`) or path to a YAML file"
                        + (f" (default: {default_recipe})" if default_recipe else
                           "; default: the config stored in --checkpoint"))
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.epochs=100 data.train=/data/train")


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
                                   "checkpoint.pth into output_dir.",
                       epilog=EXAMPLES["pretrain"] + "\n" + _config_help())
    _add_common(p, "quickstart")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in output_dir that loads (broken ones are reported and "
                        "skipped), or from the given checkpoint file")

    for name, desc in (("knn", "weighted k-NN evaluation of a frozen backbone (DINO protocol)"),
                       ("linear", "linear probe of a frozen backbone (paper protocol, or linear.mode=fast)")):
        p = sub.add_parser(name, help=desc, description=desc, formatter_class=fmt,
                           epilog=EXAMPLES[name] + "\n" + _config_help())
        _add_common(p, None)
        p.add_argument("--checkpoint", metavar="PATH",
                       help="pre-training checkpoint (or exported backbone) whose online backbone is evaluated")
        p.add_argument("--random-init", action="store_true",
                       help="evaluate a randomly initialised backbone as a baseline (architecture from --config, default quickstart)")
        p.add_argument("--output", metavar="JSON", help="also write the results to this JSON file")

    p = sub.add_parser("export", help="write the backbone's weights in timm's key layout",
                       description="Extract the online backbone from a pre-training checkpoint as a plain "
                                   "state dict that timm.create_model(..., num_classes=0) loads.")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--output", required=True, metavar="PATH", help="e.g. backbone.pth")

    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("backbones", help="list small-image presets and backbone aliases")
    sub.add_parser("methods", help="list the self-supervised methods")
    return parser


def _load_cfg(args, checkpoint_state: dict | None):
    from .config import Config, apply_overrides, from_dict, load_config

    if args.config or checkpoint_state is None:
        return load_config(args.config or "quickstart", args.overrides)
    cfg_dict = checkpoint_state.get("config")
    if cfg_dict is None:
        raise ValueError(f"{args.checkpoint} stores no config; pass --config with the recipe it was trained with")
    return from_dict(Config, apply_overrides(cfg_dict, args.overrides))


def _cmd_pretrain(args) -> int:
    from .config import load_config, to_yaml
    from .train.trainer import pretrain

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    pretrain(cfg, resume=args.resume)
    return 0


def _cmd_eval(args) -> int:
    from .build import build_backbone
    from .config import to_yaml, validate
    from .distributed import init_distributed, is_main_process
    from .eval.runner import run_knn, run_linear
    from .runtime import resolve_amp, resolve_device, seed_everything
    from .train.checkpoint import backbone_state_dict, load_backbone_weights, load_checkpoint

    if not args.checkpoint and not args.random_init:
        raise ValueError("pass --checkpoint PATH (or --random-init with --config for an untrained baseline)")
    state = load_checkpoint(args.checkpoint) if args.checkpoint else None
    cfg = _load_cfg(args, state)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    validate(cfg)
    seed_everything(cfg.train.seed)
    device = init_distributed(resolve_device(cfg.train.device))
    amp_dtype = resolve_amp(cfg.train.amp, device)
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    if state is not None:
        load_backbone_weights(backbone, backbone_state_dict(state, args.checkpoint), args.checkpoint)
    backbone.to(device)
    if args.command == "knn":
        results = run_knn(cfg, backbone, device, amp_dtype)
    else:
        results = run_linear(cfg, backbone, device, amp_dtype)
    if not is_main_process():
        return 0
    for k, v in results.items():
        print(f"{k}: {v:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cmd_export(args) -> int:
    import torch

    from .train.checkpoint import backbone_state_dict, load_checkpoint

    state = load_checkpoint(args.checkpoint)
    sd = backbone_state_dict(state, args.checkpoint)
    torch.save(sd, args.output)
    cfg = state.get("config", {})
    model = cfg.get("model", {})
    print(f"wrote {len(sd)} tensors to {args.output} (backbone {model.get('backbone', '?')}, image size "
          f"{cfg.get('data', {}).get('image_size', '?')}, extra timm kwargs {model.get('kwargs', {})})")
    return 0


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
    else:
        from .methods import METHODS

        for name, cls in METHODS.items():
            print(f"{name:10s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .config import ConfigError
    from .data import DataError
    from .models import BackboneError
    from .train.checkpoint import CheckpointError

    handlers = {"pretrain": _cmd_pretrain, "knn": _cmd_eval, "linear": _cmd_eval, "export": _cmd_export}
    from .train.guards import TrainingInterrupted

    try:
        return handlers.get(args.command, _cmd_list)(args)
    except TrainingInterrupted as e:
        print(f"mobyssl {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, DataError, BackboneError, CheckpointError, ValueError) as e:
        print(f"mobyssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    finally:
        from .distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
