"""Typed run configuration: YAML recipes plus dotted command-line overrides.

A config is a tree of dataclasses. Recipes (``mobyssl/recipes/*.yaml``) and
overrides such as ``train.epochs=100`` are merged onto the defaults and
validated at load: an unknown key names the closest valid one, a wrong type
names the expected type. Models and methods never read this object; the
trainer unpacks what each piece needs into plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


def _f(default, help: str, **kw):
    """A dataclass field with a help text (shown by ``--help`` and in the docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class AugConfig:
    crop_scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area range (MoBY/BYOL: 0.08-1).")
    color_jitter: list[float] = _f(
        [0.4, 0.4, 0.2, 0.1], "ColorJitter brightness, contrast, saturation, hue (BYOL strengths)."
    )
    color_jitter_prob: float = _f(0.8, "Probability of applying the colour jitter.")
    grayscale_prob: float = _f(0.2, "Probability of converting a view to grayscale.")
    blur_prob: list[float] = _f(
        [1.0, 0.1], "Gaussian blur probability for view 1 and view 2 (BYOL's asymmetric pair)."
    )
    blur_sigma: list[float] = _f([0.1, 2.0], "Gaussian blur sigma range in pixels (PIL radius).")
    solarize_prob: list[float] = _f([0.0, 0.2], "Solarize probability for view 1 and view 2.")
    flip_prob: float = _f(0.5, "Horizontal flip probability.")


@dataclass
class DataConfig:
    train: str = _f(
        "bundled:cifar10-sample-train",
        "Pre-training images: an ImageFolder directory, a flat folder of unlabeled images, a .zip of "
        "either, or bundled:<name> (bundled:cifar10-sample-train, bundled:cifar10-sample-test).",
    )
    test: Optional[str] = _f(
        "bundled:cifar10-sample-test",
        "Labeled split for evaluation (k-NN queries, linear-probe test set). null disables evaluation.",
    )
    eval_train: Optional[str] = _f(
        None,
        "Labeled split used as the k-NN memory bank and linear-probe training set. "
        "null: use data.train (which must then have class folders).",
    )
    image_size: int = _f(224, "Square crop size fed to the backbone, in pixels.")
    normalization: str = _f(
        "imagenet", "Mean/std preset: imagenet, cifar10, or none (no normalisation)."
    )
    eval_crop_ratio: float = _f(
        0.875,
        "Evaluation transform: resize the short side to image_size / ratio, centre-crop image_size. "
        "0.875 is the ImageNet protocol (256 -> 224); use 1.0 for small images.",
    )
    num_workers: int = _f(8, "DataLoader worker processes (0 loads in the main process).")
    pipeline: Literal["cpu", "gpu_decode", "gpu_resident"] = _f(
        "cpu",
        "Where images are decoded and augmented. cpu: PIL in DataLoader workers (any device, any data). "
        "gpu_decode: workers only read file bytes; JPEGs are decoded and augmented in batches on the "
        "training device (any dataset size). gpu_resident: the dataset is decoded once into uint8 tensors "
        "on the device at data.image_size, then augmented there (datasets that fit in device memory, e.g. "
        "CIFAR-10: 150 MiB). The gpu_* pipelines run on a CPU device too.",
    )
    max_bad_fraction: float = _f(
        0.01, "Unreadable training images are skipped and listed; stop if more than this fraction fails."
    )
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class ModelConfig:
    backbone: str = _f(
        "swin_tiny_patch4_window7_224",
        "Backbone name: any timm model name or a mobyssl small-image preset (see `mobyssl backbones`).",
    )
    drop_path_rate: float = _f(0.2, "Stochastic depth of the online encoder (MoBY: 0.2).")
    target_drop_path_rate: float = _f(0.0, "Stochastic depth of the target encoder (MoBY: 0.0).")
    norm_before_mlp: Literal["ln", "bn"] = _f(
        "ln",
        "Swin only: normalisation before each block's MLP. 'bn' is the paper's MoBY-1 variant "
        "(BatchNorm, +1.1 top-1 at 100 epochs).",
    )
    kwargs: dict = _f({}, "Extra keyword arguments passed to timm.create_model (e.g. {embed_dim: 96}).")


@dataclass
class MethodConfig:
    name: str = _f("moby", "Self-supervised method (see `mobyssl methods`).")
    proj_hidden_dim: int = _f(4096, "Projector hidden width (MoBY: 4096).")
    proj_dim: int = _f(256, "Projector/predictor output width (MoBY: 256).")
    pred_hidden_dim: int = _f(4096, "Predictor hidden width (MoBY: 4096).")
    queue_size: int = _f(
        4096, "Negatives per view queue (MoBY: 4096). Must be a multiple of the global batch size."
    )
    temperature: float = _f(0.2, "InfoNCE temperature (MoBY: 0.2).")
    momentum: float = _f(
        0.99, "Base EMA momentum of the target branch; rises to 1.0 on a cosine over training (MoBY: 0.99)."
    )


@dataclass
class TrainConfig:
    epochs: int = _f(300, "Pre-training epochs (MoBY ImageNet recipes: 300; the paper's ablations: 100).")
    warmup_epochs: float = _f(5, "Linear lr warm-up epochs (MoBY: 5).")
    batch_size: int = _f(
        512,
        "Global batch size (all devices together; MoBY: 512 = 8 GPUs x 64). Lower it if you run "
        "out of memory; the lr follows linearly.",
    )
    lr: float = _f(
        1e-3,
        "Base learning rate for a batch of train.lr_ref_batch images; the used lr is "
        "lr * batch_size / lr_ref_batch (MoBY: 1e-3 per 512).",
    )
    lr_ref_batch: int = _f(512, "Reference batch size that train.lr is given for.")
    warmup_lr: float = _f(5e-7, "lr at the start of warm-up, scaled like train.lr (Swin/MoBY: 5e-7).")
    min_lr: float = _f(5e-6, "Final lr of the cosine schedule, scaled like train.lr (Swin/MoBY: 5e-6).")
    weight_decay: float = _f(0.05, "AdamW weight decay; never applied to biases and 1-D parameters.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    clip_grad: Optional[float] = _f(5.0, "Clip the global gradient norm to this value (null: off).")
    accum_steps: int = _f(
        1, "Split each batch into this many micro-batches and accumulate gradients (for large backbones "
        "on small GPUs). Queues and momentum still update once per optimizer step; BatchNorm statistics "
        "are per micro-batch."
    )
    compile: bool = _f(
        False, "torch.compile the training step's model (fewer, fused kernels on GPUs; the first steps "
        "take a minute or more to compile)."
    )
    grad_checkpointing: bool = _f(
        False, "Recompute the online backbone's activations in the backward pass (timm "
        "set_grad_checkpointing): less memory, about 30% more compute."
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = _f(
        "auto",
        "Mixed precision: auto = bf16 on GPUs that support it, fp16 with a grad scaler on older "
        "GPUs, off on CPU.",
    )
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda, or cuda:N.")
    seed: int = _f(0, "Random seed.")
    log_every: int = _f(10, "Log a metrics.jsonl line (and a TensorBoard point) every N steps.")
    save_every: int = _f(1, "Write checkpoint.pth every N epochs (and always at the end).")
    save_every_steps: int = _f(
        0, "Also write a checkpoint every N optimizer steps (0: only at epoch ends). Set it for long epochs "
        "on pre-emptible machines: a resume then loses at most N steps and continues the same trajectory."
    )
    keep_last: int = _f(2, "How many recent checkpoints to keep (checkpoint.pth points at the newest); >= 1.")
    keep_every: int = _f(0, "Also keep a permanent copy every N epochs (0: none).")
    max_bad_steps: int = _f(
        10, "A step with a NaN/Inf loss or gradient is skipped with a warning; after this many in a row the "
        "run stops and writes checkpoint_diagnostic.pth."
    )
    knn_every: int = _f(
        0, "Run a k-NN evaluation on data.test every N epochs (0: only at the end; -1: never)."
    )
    max_steps: int = _f(
        0, "Stop after this many optimizer steps (0: run all epochs). Schedules keep their full length."
    )


@dataclass
class KnnConfig:
    k: list[int] = _f([20, 200], "Neighbour counts to report (DINO protocol: 20; also 200).")
    temperature: float = _f(0.07, "Temperature of the weighted vote (DINO: 0.07).")
    batch_size: int = _f(256, "Batch size for feature extraction.")


@dataclass
class LinearConfig:
    mode: Literal["full", "fast"] = _f(
        "full",
        "full: the paper's protocol, augmented images through the frozen backbone every epoch. "
        "fast: features computed once (no augmentation), then a linear classifier on them; for "
        "small datasets and quick checks.",
    )
    epochs: int = _f(100, "Linear-probe epochs (paper protocol: 100).")
    batch_size: int = _f(1024, "Linear-probe batch size.")
    lr: float = _f(1.0, "SGD lr per linear.lr_ref_batch images (paper protocol: 1.0 per 512).")
    lr_ref_batch: int = _f(512, "Reference batch for linear.lr.")
    momentum: float = _f(0.9, "SGD momentum.")
    weight_decay: float = _f(0.0, "Weight decay of the linear layer (paper protocol: 0).")


@dataclass
class Config:
    output_dir: str = _f("runs/quickstart", "Where the run writes config, metrics, TensorBoard and checkpoints.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)


# --------------------------------------------------------------------------- loading


def recipe_dir() -> Path:
    return Path(str(resources.files("mobyssl") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe by name (``moby_swin_tiny_in1k``) or by path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = recipe_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = list_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown recipe '{name_or_path}'.{hint} Shipped recipes: {', '.join(names)}; "
        "or pass a path to a YAML file."
    )


def load_config(recipe: Optional[str] = "quickstart", overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- recipe (with its ``base:`` chain) <- ``key=value`` overrides, validated."""
    raw: dict = {}
    if recipe:
        raw = _load_yaml_chain(resolve_recipe(recipe), seen=())
    apply_overrides(raw, overrides)
    return from_dict(Config, raw)


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``key=value`` strings onto a nested dict in place (validated later by ``from_dict``)."""
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(raw, key, value)
    return raw


def _load_yaml_chain(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base) if base.endswith((".yaml", ".yml")) else resolve_recipe(base)
    merged = _load_yaml_chain(Path(base_path), seen + (path,))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "kwargs":
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=100`` -> ('train.epochs', 100); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=100")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``raw``, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint} (valid keys here: "
                f"{', '.join(prefix + f for f in fields)})"
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, raw[name], prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(raw[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: `train.amp=off`
            for c in choices:
                if isinstance(c, str) and yaml.safe_load(c) is value:
                    return c
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
                try:
                    return float(value)
                except ValueError:
                    raise bad from None
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def iter_fields(cls=Config, prefix: str = ""):
    """(dotted key, default, help) for every leaf key: drives ``--help`` and the docs."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata.get("help", "")


def validate(cfg: Config) -> None:
    """Value checks that go beyond types; each message names the key and the fix."""

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"config key '{key}' {msg}")

    t, d, m = cfg.train, cfg.data, cfg.method
    need(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
    need(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    need(t.lr_ref_batch > 0, "train.lr_ref_batch", f"must be positive, got {t.lr_ref_batch}")
    need(0 <= t.warmup_epochs <= t.epochs, "train.warmup_epochs", f"must lie in [0, train.epochs], got {t.warmup_epochs}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(len(t.betas) == 2, "train.betas", f"needs two values, got {t.betas}")
    need(t.clip_grad is None or t.clip_grad > 0, "train.clip_grad", f"must be positive or null, got {t.clip_grad}")
    need(t.accum_steps >= 1, "train.accum_steps", f"must be at least 1, got {t.accum_steps}")
    need(t.log_every > 0, "train.log_every", f"must be positive, got {t.log_every}")
    need(t.save_every > 0, "train.save_every", f"must be positive, got {t.save_every}")
    need(t.save_every_steps >= 0, "train.save_every_steps", f"must be >= 0, got {t.save_every_steps}")
    need(t.keep_last >= 1, "train.keep_last", f"must be at least 1, got {t.keep_last}")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be at least 1, got {t.max_bad_steps}")
    need(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", f"must lie in [0, 1], got {d.max_bad_fraction}")
    need(d.image_size >= 8, "data.image_size", f"must be at least 8 pixels, got {d.image_size}")
    need(0 < d.eval_crop_ratio <= 1, "data.eval_crop_ratio", f"must lie in (0, 1], got {d.eval_crop_ratio}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(d.normalization in ("imagenet", "cifar10", "none"), "data.normalization",
         f"must be imagenet, cifar10 or none, got {d.normalization!r}")
    a = d.aug
    need(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "data.aug.crop_scale",
         f"must be [min, max] with 0 < min <= max <= 1, got {a.crop_scale}")
    need(len(a.color_jitter) == 4, "data.aug.color_jitter", f"needs 4 values, got {a.color_jitter}")
    for key in ("blur_prob", "solarize_prob"):
        v = getattr(a, key)
        need(len(v) == 2 and all(0 <= p <= 1 for p in v), f"data.aug.{key}",
             f"needs two probabilities (view 1, view 2), got {v}")
    need(len(a.blur_sigma) == 2 and 0 < a.blur_sigma[0] <= a.blur_sigma[1], "data.aug.blur_sigma",
         f"must be [min, max] with 0 < min <= max, got {a.blur_sigma}")
    need(0 <= cfg.model.drop_path_rate < 1, "model.drop_path_rate", f"must lie in [0, 1), got {cfg.model.drop_path_rate}")
    need(0 <= cfg.model.target_drop_path_rate < 1, "model.target_drop_path_rate",
         f"must lie in [0, 1), got {cfg.model.target_drop_path_rate}")
    need(0 <= m.momentum < 1, "method.momentum", f"must lie in [0, 1), got {m.momentum}")
    need(m.temperature > 0, "method.temperature", f"must be positive, got {m.temperature}")
    need(m.queue_size > 0, "method.queue_size", f"must be positive, got {m.queue_size}")
    need(cfg.knn.temperature > 0, "knn.temperature", f"must be positive, got {cfg.knn.temperature}")
    need(len(cfg.knn.k) > 0 and all(k > 0 for k in cfg.knn.k), "knn.k", f"must be positive integers, got {cfg.knn.k}")
    need(cfg.linear.epochs > 0, "linear.epochs", f"must be positive, got {cfg.linear.epochs}")
