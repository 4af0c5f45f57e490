"""Typed run configuration: YAML recipes plus dotted command-line overrides, validated by declaration.

A config is a tree of pydantic models. Every field declares, next to its help text, its type and its
constraint (positive, in a range, one of a set, an ordered pair, finite: inf and nan are refused
everywhere) and what changing it means for a resumed run. Validation, ``--help``, the JSON schema for
editors and the resume check are all derived from those declarations; nothing is checked by hand.

Recipes (``mobyssl/recipes/*.yaml``) and overrides such as ``train.epochs=100`` are merged onto the
defaults and validated at load: an unknown key names the closest valid one, a wrong type names the
expected type, a value out of range names the range. A method's own options (``method.*``) are declared
with the method (``MethodOptions`` subclasses, registered with ``register_method_options``) and chosen by
``method.name``. Models and methods never read this object's globals; the trainer and ``build.py``
unpack what each piece needs.
"""

from __future__ import annotations

import difflib
import re
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional

import annotated_types as at
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from .errors import ConfigError

# What a change of a field means when a run is resumed (``--resume`` compares the checkpoint's config):
SAFE = "safe"                  # how the run is operated, logged or evaluated: changed freely
SCHEDULE = "schedule"          # the length of the schedules: the rest of the run follows new ones
TRAJECTORY = "trajectory"      # the optimisation itself: a different run from this step on
ARCHITECTURE = "architecture"  # the shapes of the weights or buffers: the checkpoint no longer fits
RESUME_KINDS = (SAFE, SCHEDULE, TRAJECTORY, ARCHITECTURE)
RESUME_KEY = "on_resume"


def opt(default, help: str, *, on_resume: str = TRAJECTORY, **constraints) -> Any:
    """A config field: default, help text (``--help``, docs), constraints and its meaning on resume."""
    if on_resume not in RESUME_KINDS:
        # A method's own options use this too: an unknown kind would make resume ignore changes to the field.
        raise ValueError(f"on_resume={on_resume!r} is not one of {', '.join(RESUME_KINDS)}")
    extra = {RESUME_KEY: on_resume}
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=help, json_schema_extra=extra,
                     **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


# --------------------------------------------------------------------------- value types


_WRONG_TYPE = "wrong type"  # a validator's message for "not of the declared type": the field's type is named


def _no_bool(value):
    # YAML reads true/false/yes/no/on/off as booleans; pydantic would take them as 1/0.
    if isinstance(value, bool):
        raise ValueError(_WRONG_TYPE)
    return value


def _yaml_choice(*choices):
    """YAML 1.1 reads a bare ``off``/``on``/``yes``/``no`` as a boolean: map it back to the choice."""

    def convert(value):
        if isinstance(value, bool):
            for c in choices:
                if isinstance(c, str) and yaml.safe_load(c) is value:
                    return c
        return value

    return BeforeValidator(convert)


def _not_blank(value):
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _device(spec: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", spec):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return spec


def _ordered(pair):
    if pair[0] > pair[1]:
        raise ValueError("must be [min, max] with min <= max")
    return pair


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Text = Annotated[str, AfterValidator(_not_blank)]
Probability = Annotated[Float, Field(ge=0, le=1)]
BUNDLED_TEST = "bundled:cifar10-sample-test"  # the quickstart's data.test
ProbabilityPair = Annotated[list[Probability], Field(min_length=2, max_length=2)]


def Choice(*choices: str):
    return Annotated[Literal[choices], _yaml_choice(*choices)]


def OrderedPair(**bounds):
    item = Annotated[Float, Field(**bounds)]
    return Annotated[list[item], Field(min_length=2, max_length=2), AfterValidator(_ordered)]


class Section(BaseModel):
    """A group of config keys: unknown keys, inf and nan are refused; assignments are validated."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True,
                              validate_assignment=True, validate_default=True)
    key_prefix: ClassVar[str] = ""  # where the section sits in the config, for messages

    def __setattr__(self, name, value):
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError(_explain(e, type(self), {}, self.key_prefix)) from None


# --------------------------------------------------------------------------- sections


class AugConfig(Section):
    key_prefix: ClassVar[str] = "data.aug."

    crop_scale: OrderedPair(gt=0, le=1) = opt([0.08, 1.0], "RandomResizedCrop area range (MoBY/BYOL: 0.08-1).")
    color_jitter: Annotated[list[Annotated[Float, Field(ge=0, le=5)]], Field(min_length=4, max_length=4)] = opt(
        [0.4, 0.4, 0.2, 0.1], "ColorJitter brightness, contrast, saturation, hue (BYOL strengths); hue <= 0.5.")
    color_jitter_prob: Probability = opt(0.8, "Probability of applying the colour jitter.")
    grayscale_prob: Probability = opt(0.2, "Probability of converting a view to grayscale.")
    blur_prob: ProbabilityPair = opt(
        [1.0, 0.1], "Gaussian blur probability for view 1 and view 2 (BYOL's asymmetric pair; DINO/EsViT: of the 2 "
        "global crops, same values).")
    blur_sigma: OrderedPair(gt=0, le=100) = opt([0.1, 2.0], "Gaussian blur sigma range in pixels (PIL radius).")
    solarize_prob: ProbabilityPair = opt([0.0, 0.2], "Solarize probability for view 1 and view 2 (DINO/EsViT: of "
                                                     "the 2 global crops).")
    flip_prob: Probability = opt(0.5, "Horizontal flip probability.")

    @field_validator("color_jitter")
    @classmethod
    def _hue(cls, v):
        if v[3] > 0.5:
            raise ValueError("must have a hue (the 4th value) of at most 0.5")
        return v


class DataConfig(Section):
    key_prefix: ClassVar[str] = "data."

    train: Text = opt(
        "bundled:cifar10-sample-train",
        "Pre-training images: an ImageFolder directory, a flat folder of unlabeled images, a .zip of "
        "either, WebDataset .tar shards (a file, a brace pattern such as /data/train-{0000..0127}.tar, or a folder "
        "of .tar files; read as a stream, each process its own shards), or bundled:<name> "
        "(bundled:cifar10-sample-train, bundled:cifar10-sample-test).")
    test: Optional[Text] = opt(
        BUNDLED_TEST,
        "Labeled split for evaluation (k-NN queries, linear-probe test set): a folder, .zip or labelled .tar "
        "shards, like data.train. null disables evaluation. While it "
        "is the bundled sample, pre-training on data without its classes runs without k-NN (with a notice).",
        on_resume=SAFE)
    eval_train: Optional[Text] = opt(
        None,
        "Labeled split used as the k-NN memory bank and linear-probe training set (a folder, .zip or labelled .tar "
        "shards). "
        "null: use data.train (which must then have class folders).", on_resume=SAFE)
    image_size: Int = opt(224, "Square crop size fed to the backbone, in pixels.", on_resume=ARCHITECTURE,
                          ge=8, le=8192)
    normalization: Choice("imagenet", "cifar10", "none") = opt(
        "imagenet", "Mean/std preset: imagenet, cifar10, or none (no normalisation).")
    eval_crop_ratio: Float = opt(
        0.875,
        "Evaluation transform: resize the short side to image_size / ratio, centre-crop image_size. "
        "0.875 is the ImageNet protocol (256 -> 224); use 1.0 for small images.", on_resume=SAFE, gt=0, le=1)
    num_workers: Int = opt(8, "DataLoader worker processes (0 loads in the main process).", on_resume=SAFE,
                           ge=0, le=512)
    pipeline: Choice("cpu", "gpu_decode", "gpu_resident") = opt(
        "cpu",
        "Where images are decoded and augmented. cpu: PIL in DataLoader workers (any device, any data). "
        "gpu_decode: workers only read file bytes; JPEGs are decoded and augmented in batches on the "
        "training device (any dataset size). gpu_resident: the dataset is decoded once into uint8 tensors "
        "on the device at data.image_size, then augmented there (datasets that fit in device memory, e.g. "
        "CIFAR-10: 150 MiB). The gpu_* pipelines run on a CPU device too.")
    jpeg_draft: bool = opt(
        False,
        "data.pipeline=cpu: decode each JPEG at 1/2, 1/4 or 1/8 of its size (the decoder's own reduced-size mode) "
        "when even the smallest crop the augmentation can cut still has its output size there. Much faster on large "
        "photos (a 12-megapixel JPEG: see BENCHMARKS.md); no effect where crops are close to the image size "
        "(CIFAR-10). Off by default: the reduced decode changes pixels slightly, and its effect on quality is not "
        "measured yet.")
    shuffle_buffer: Int = opt(
        1000,
        "WebDataset shards in pre-training: samples are shuffled within a window of this many as each process "
        "streams its shards (the shards' order is shuffled every epoch too). Larger mixes better and costs no "
        "memory for images (the window holds indices); 1: shard order only.", ge=1, le=100_000_000)
    max_bad_fraction: Probability = opt(
        0.01, "Unreadable images are skipped and listed; stop if more than this fraction of a split fails.",
        on_resume=SAFE)
    aug: AugConfig = Field(default_factory=AugConfig)


class ModelConfig(Section):
    key_prefix: ClassVar[str] = "model."

    backbone: Text = opt(
        "swin_tiny_patch4_window7_224",
        "Backbone name: any timm model name or a mobyssl small-image preset (see `mobyssl backbones`).",
        on_resume=ARCHITECTURE)
    drop_path_rate: Float = opt(0.2, "Stochastic depth of the online encoder (MoBY: 0.2).", ge=0, lt=1)
    target_drop_path_rate: Float = opt(0.0, "Stochastic depth of the target encoder (MoBY: 0.0).", ge=0, lt=1)
    norm_before_mlp: Choice("ln", "bn") = opt(
        "ln",
        "Swin only: normalisation before each block's MLP. 'bn' is the paper's MoBY-1 variant "
        "(BatchNorm, +1.1 top-1 at 100 epochs).", on_resume=ARCHITECTURE)
    kwargs: dict[str, Any] = opt({}, "Extra keyword arguments passed to timm.create_model (e.g. {embed_dim: 96}).",
                                 on_resume=ARCHITECTURE)
    init: Optional[Text] = opt(
        None, "Start pre-training from these backbone weights instead of random ones (continual pre-training on "
              "your own images): a mobyssl checkpoint or export, a timm state dict, or a published DINO, EsViT or "
              "MoBY checkpoint. The trained backbone and its momentum copy start from them; heads start fresh. The "
              "weights must fit model.backbone / model.kwargs / data.image_size.", on_resume=SAFE)


def method_name(name: str) -> Any:
    """The ``name`` field of a method's options class: ``name: Text = method_name("moby")``."""
    return opt(name, "Self-supervised method (see `mobyssl methods`). Picking another method than the recipe's "
               "starts method.* from that method's defaults.", on_resume=ARCHITECTURE)


def register_method_options(cls: type[MethodOptions]) -> type[MethodOptions]:
    """Class decorator: register the ``method.*`` options of the method named by the class's ``name`` default."""
    if not issubclass(cls, MethodOptions):
        raise TypeError(f"{cls.__name__} must subclass MethodOptions")
    name = cls.model_fields["name"].default
    if name in METHOD_OPTIONS and METHOD_OPTIONS[name] is not cls:
        raise ValueError(f"method options for '{name}' are registered twice")
    METHOD_OPTIONS[name] = cls
    return cls


class MethodOptions(Section):
    """Base of every method's options: ``method.name`` picks the method and with it the other ``method.*`` keys."""

    key_prefix: ClassVar[str] = "method."

    name: Text = method_name("moby")


class TrainConfig(Section):
    key_prefix: ClassVar[str] = "train."

    epochs: Int = opt(300, "Pre-training epochs (MoBY ImageNet recipes: 300; the paper's ablations: 100).",
                      on_resume=SCHEDULE, ge=1, le=100_000)
    warmup_epochs: Float = opt(5, "Linear lr warm-up epochs (MoBY: 5); at most train.epochs.", ge=0, le=100_000)
    batch_size: Int = opt(
        512,
        "Global batch size (all devices together; MoBY: 512 = 8 GPUs x 64). Lower it if you run "
        "out of memory; the lr follows linearly.", ge=1, le=2**20)
    lr: Float = opt(
        1e-3,
        "Base learning rate for a batch of train.lr_ref_batch images; the used lr is "
        "lr * batch_size / lr_ref_batch (MoBY: 1e-3 per 512).", gt=0, le=10)
    lr_ref_batch: Int = opt(512, "Reference batch size that train.lr is given for.", ge=1, le=2**20)
    warmup_lr: Float = opt(5e-7, "lr at the start of warm-up, scaled like train.lr (Swin/MoBY: 5e-7); "
                                 "at most train.lr.", ge=0, le=10)
    min_lr: Float = opt(5e-6, "Final lr of the cosine schedule, scaled like train.lr (Swin/MoBY: 5e-6); "
                              "at most train.lr.", ge=0, le=10)
    weight_decay: Float = opt(0.05, "AdamW weight decay; never applied to biases and 1-D parameters.", ge=0, le=10)
    weight_decay_end: Optional[Float] = opt(
        None, "Weight decay at the end of training, reached on a cosine over the steps from train.weight_decay "
        "(DINO/EsViT: 0.04 -> 0.4). null: train.weight_decay throughout (MoBY).", ge=0, le=10)
    betas: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = opt(
        [0.9, 0.999], "AdamW betas, each in [0, 1).")
    clip_grad: Optional[Float] = opt(5.0, "Clip gradient norms to this value (null: off); see train.clip_mode.",
                                     gt=0, le=1e6)
    clip_mode: Choice("global", "per_parameter") = opt(
        "global", "global: clip the norm of all gradients together (MoBY, Swin). per_parameter: clip each "
        "parameter tensor's gradient on its own (DINO, EsViT: 3.0), so one exploding layer does not shrink the "
        "others' updates.")
    accum_steps: Int = opt(
        1, "Split each batch into this many micro-batches and accumulate gradients (for large backbones "
        "on small GPUs). Queues and momentum still update once per optimizer step; BatchNorm statistics "
        "are per micro-batch.", ge=1, le=4096)
    compile: bool = opt(
        False, "torch.compile the training step's model, and on a GPU the gpu_* pipelines' per-pixel "
        "augmentation (fewer, fused kernels; the first steps take a minute or more to compile).", on_resume=SAFE)
    grad_checkpointing: bool = opt(
        False, "Recompute the online backbone's activations in the backward pass (timm "
        "set_grad_checkpointing): less memory, about 30% more compute.", on_resume=SAFE)
    amp: Choice("auto", "bf16", "fp16", "off") = opt(
        "auto",
        "Mixed precision: auto = bf16 on GPUs that support it, fp16 with a grad scaler on older "
        "GPUs, off on CPU.")
    device: Annotated[Text, AfterValidator(_device)] = opt(
        "auto", "auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.", on_resume=SAFE)
    seed: Int = opt(0, "Random seed (0 to 2^32 - 1).", ge=0, le=2**32 - 1)
    log_every: Int = opt(10, "Log a metrics.jsonl line (and a TensorBoard point) every N steps.", on_resume=SAFE,
                         ge=1, le=10**9)
    save_every: Int = opt(1, "Write checkpoint.pth every N epochs (and always at the end).", on_resume=SAFE,
                          ge=1, le=10**6)
    save_every_steps: Int = opt(
        0, "Also write a checkpoint every N optimizer steps (0: only at epoch ends). Set it for long epochs "
        "on pre-emptible machines: a resume then loses at most N steps and continues the same trajectory.",
        on_resume=SAFE, ge=0, le=10**9)
    keep_last: Int = opt(2, "How many recent checkpoints to keep (checkpoint.pth points at the newest); >= 1.",
                         on_resume=SAFE, ge=1, le=10**4)
    keep_every: Int = opt(0, "Also keep a permanent copy every N epochs (0: none).", on_resume=SAFE, ge=0, le=10**6)
    max_bad_steps: Int = opt(
        10, "A step with a NaN/Inf loss or gradient is skipped with a warning; after this many in a row the "
        "run stops and writes checkpoint_diagnostic.pth.", on_resume=SAFE, ge=1, le=10**6)
    knn_every: Int = opt(
        0, "Run a k-NN evaluation on data.test every N epochs (0: only at the end; -1: never).", on_resume=SAFE,
        ge=-1, le=10**6)
    max_steps: Int = opt(
        0, "Stop after this many optimizer steps (0: run all epochs). Schedules keep their full length.",
        on_resume=SAFE, ge=0, le=10**12)
    pictures_every: Int = opt(
        1, "Write the method's pictures (SiT: corrupted input, reconstruction, original, mask) as PNGs in "
        "<output_dir>/pictures every N epochs, from the first batch of the epoch (0: never; methods without "
        "pictures write nothing). Drawn on the side: the training trajectory is the same either way.",
        on_resume=SAFE, ge=0, le=10**6)

    @model_validator(mode="after")
    def _relations(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"config key 'train.warmup_epochs' must be at most train.epochs={self.epochs}, "
                             f"got {self.warmup_epochs:g}")
        for key in ("min_lr", "warmup_lr"):
            if getattr(self, key) > self.lr:
                raise ValueError(f"config key 'train.{key}' must be at most train.lr={self.lr:g} (the schedule "
                                 f"would rise instead of fall), got {getattr(self, key):g}")
        return self


class KnnConfig(Section):
    key_prefix: ClassVar[str] = "knn."

    k: Annotated[list[Annotated[Int, Field(ge=1, le=10**6)]], Field(min_length=1, max_length=32)] = opt(
        [20, 200], "Neighbour counts to report (DINO protocol: 20; also 200).", on_resume=SAFE)
    temperature: Float = opt(0.07, "Temperature of the weighted vote (DINO: 0.07).", on_resume=SAFE, gt=0, le=100)
    batch_size: Int = opt(256, "Batch size for feature extraction.", on_resume=SAFE, ge=1, le=2**16)


class LinearConfig(Section):
    key_prefix: ClassVar[str] = "linear."

    mode: Choice("full", "fast") = opt(
        "full",
        "full: the paper's protocol, augmented images through the frozen backbone every epoch. "
        "fast: features computed once (no augmentation), then a linear classifier on them; for "
        "small datasets and quick checks.", on_resume=SAFE)
    epochs: Int = opt(100, "Linear-probe epochs (paper protocol: 100).", on_resume=SAFE, ge=1, le=100_000)
    batch_size: Int = opt(1024, "Linear-probe batch size.", on_resume=SAFE, ge=1, le=2**20)
    lr: Float = opt(1.0, "SGD lr per linear.lr_ref_batch images (paper protocol: 1.0 per 512).", on_resume=SAFE,
                    gt=0, le=1000)
    lr_ref_batch: Int = opt(512, "Reference batch for linear.lr.", on_resume=SAFE, ge=1, le=2**20)
    momentum: Float = opt(0.9, "SGD momentum.", on_resume=SAFE, ge=0, lt=1)
    weight_decay: Float = opt(0.0, "Weight decay of the linear layer (paper protocol: 0).", on_resume=SAFE,
                              ge=0, le=10)
    n_last_blocks: Int = opt(
        1, "Features of the last N transformer blocks, each pooled, concatenated. 1: the backbone's pooled "
        "feature (MoBY's protocol). 4: DINO's ViT protocol (class tokens through the final norm) and EsViT's Swin "
        "protocol (average-pooled tokens, the final norm on the last stage's blocks only).", on_resume=SAFE,
        ge=1, le=1000)


class FewshotConfig(Section):
    key_prefix: ClassVar[str] = "fewshot."

    shots: Annotated[list[Annotated[Int, Field(ge=1, le=10**6)]], Field(min_length=1, max_length=32)] = opt(
        [1, 5, 10, 25], "Labelled images per class (N) drawn from data.eval_train (or data.train) for each "
        "N-shot classifier; each N must be at most the image count of the smallest class.", on_resume=SAFE)
    trials: Int = opt(5, "Random draws per N (seeded by train.seed); the report gives the mean and its 95% "
                         "interval over them.", on_resume=SAFE, ge=1, le=10_000)
    l2: Float = opt(0.01, "L2 penalty of the logistic regression on standardised features (per-feature "
                                "weights; raise it for very few shots or wide features).", on_resume=SAFE,
                    ge=0, le=1e6)


class CorrespondenceConfig(Section):
    key_prefix: ClassVar[str] = "correspondence."

    top_k: Int = opt(10, "Most similar token pairs scored per image (EsViT: 10); at most the tokens of the "
                         "final grid (a 32 px Swin with patch 2 has 2x2).", on_resume=SAFE, ge=1, le=10**6)
    flip: bool = opt(True, "View 2 is the horizontally flipped image (EsViT); false: not flipped, so the true "
                           "match is the same token.", on_resume=SAFE)
    jitter: Annotated[list[Annotated[Float, Field(ge=0, le=5)]], Field(min_length=4, max_length=4)] = opt(
        [0.4, 0.4, 0.2, 0.1], "View 2's colour jitter strengths: brightness, contrast, saturation, hue (EsViT).",
        on_resume=SAFE)
    jitter_prob: Probability = opt(0.8, "Probability of view 2's colour jitter (EsViT: 0.8).", on_resume=SAFE)
    grayscale: bool = opt(True, "View 2 is made grey (EsViT: always).", on_resume=SAFE)


class FinetuneConfig(Section):
    """End-to-end supervised fine-tuning (``mobyssl finetune``); defaults: MAE's / BEiT's ViT recipe. None of these
    keys changes a pre-training run, so a pre-training resume accepts any change to them."""

    key_prefix: ClassVar[str] = "finetune."

    output_dir: Optional[Text] = opt(None, "Folder of the fine-tuning run (new or empty; --resume continues it). "
                                           "null: <checkpoint's folder>/finetune, or runs/finetune_random_init with "
                                           "--random-init.", on_resume=SAFE)
    epochs: Int = opt(100, "Fine-tuning epochs (MAE's ViT-B / BEiT: 100).", ge=1, le=100_000, on_resume=SAFE)
    warmup_epochs: Float = opt(5, "Linear lr warm-up epochs (MAE: 5); at most finetune.epochs.", ge=0, le=100_000, on_resume=SAFE)
    batch_size: Int = opt(1024, "Images per step over all processes (MAE: 1,024).", ge=2, le=2**20, on_resume=SAFE)
    lr: Float = opt(5e-4, "AdamW peak lr per finetune.lr_ref_batch images (MAE: 5e-4 per 256), scaled linearly.",
                    gt=0, le=10, on_resume=SAFE)
    lr_ref_batch: Int = opt(256, "Reference batch for finetune.lr.", ge=1, le=2**20, on_resume=SAFE)
    min_lr: Float = opt(1e-6, "Final lr of the cosine schedule (MAE: 1e-6).", ge=0, le=10, on_resume=SAFE)
    weight_decay: Float = opt(0.05, "AdamW weight decay (MAE: 0.05); not on biases, norms and tokens.", ge=0,
                              le=10, on_resume=SAFE)
    layer_decay: Float = opt(0.75, "Layer-wise lr decay: block i of L gets lr x decay^(L - i) (MAE: 0.65 for "
                                   "ViT-B, 0.75 for ViT-L; BEiT's ViT-S 0.75). 1: no decay.", gt=0, le=1, on_resume=SAFE)
    drop_path: Float = opt(0.1, "Stochastic depth of the fine-tuned backbone (MAE: 0.1).", ge=0, lt=1, on_resume=SAFE)
    label_smoothing: Float = opt(0.1, "Label smoothing (MAE: 0.1).", ge=0, lt=1, on_resume=SAFE)
    mixup: Float = opt(0.8, "Mixup alpha (MAE: 0.8; 0: off).", ge=0, le=100, on_resume=SAFE)
    cutmix: Float = opt(1.0, "CutMix alpha (MAE: 1.0; 0: off). Each batch gets mixup or CutMix, half and half.",
                        ge=0, le=100, on_resume=SAFE)
    rand_augment: Optional[Text] = opt("rand-m9-mstd0.5-inc1", "timm RandAugment policy (MAE's); null: none.", on_resume=SAFE)
    random_erasing: Probability = opt(0.25, "Random erasing probability, per-pixel noise (MAE: 0.25).", on_resume=SAFE)
    crop_scale: Annotated[list[Probability], Field(min_length=2, max_length=2)] = opt(
        [0.08, 1.0], "RandomResizedCrop area range (timm / MAE: 0.08-1).", on_resume=SAFE)
    clip_grad: Optional[Float] = opt(None, "Clip the gradient norm to this value (MAE: null, off).", gt=0, le=1e6, on_resume=SAFE)

    @model_validator(mode="after")
    def _relations(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"config key 'finetune.warmup_epochs' must be at most finetune.epochs={self.epochs}, "
                             f"got {self.warmup_epochs:g}")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"config key 'finetune.crop_scale' must be [low, high] with low <= high, got "
                             f"{self.crop_scale}")
        return self


# --------------------------------------------------------------------------- per-method options

METHOD_OPTIONS: dict[str, type[MethodOptions]] = {}
DEFAULT_METHOD = "moby"


# Set by the package root (``mobyssl/__init__.py``) to import the modules that register method options, so
# that this module never depends on the methods above it.
method_discovery: Optional[Callable[[], None]] = None


def _discover_methods() -> None:
    if method_discovery is not None:
        method_discovery()


def method_options_class(name: str) -> type[MethodOptions]:
    if name not in METHOD_OPTIONS:
        _discover_methods()
    if name not in METHOD_OPTIONS:
        close = difflib.get_close_matches(str(name), list(METHOD_OPTIONS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"config key 'method.name': unknown method '{name}'.{hint} "
                         f"Available: {', '.join(sorted(METHOD_OPTIONS))} (see `mobyssl methods`).")
    return METHOD_OPTIONS[name]


def method_names() -> list[str]:
    _discover_methods()
    return sorted(METHOD_OPTIONS)


def _default_method() -> MethodOptions:
    return method_options_class(DEFAULT_METHOD)()


class Config(Section):
    output_dir: Text = opt("runs/quickstart", "Where the run writes config, metrics, TensorBoard and checkpoints; "
                                              "a new run needs a new or empty folder.", on_resume=SAFE)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodOptions] = Field(default_factory=_default_method)
    train: TrainConfig = Field(default_factory=TrainConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    linear: LinearConfig = Field(default_factory=LinearConfig)
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig)
    correspondence: CorrespondenceConfig = Field(default_factory=CorrespondenceConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @field_validator("method", mode="wrap")
    @classmethod
    def _method_options(cls, value, handler):
        """``method.name`` picks the options class; the other ``method.*`` keys are validated by it."""
        if isinstance(value, MethodOptions):
            value = value.model_dump()
        if not isinstance(value, dict):
            return handler(value)
        name = value.get("name", DEFAULT_METHOD)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"config key 'method.name' expects a method name such as '{DEFAULT_METHOD}', "
                             f"got {name!r}")
        return method_options_class(name).model_validate(value)


SECTIONS = ("data", "model", "method", "train", "knn", "linear", "fewshot", "correspondence", "finetune")


# --------------------------------------------------------------------------- loading


def recipe_dir() -> Path:
    return Path(str(resources.files("mobyssl") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe by name (``moby_swin_tiny_in1k``) or by path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            raise ConfigError(f"--config {p} is a folder; give a recipe name or a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; check the path, or give the name of a shipped recipe "
                              "(see `mobyssl recipes`)")
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


def load_config(recipe: Optional[str] = "quickstart", overrides: typing.Sequence[str] = (),
                notices: Optional[list] = None) -> Config:
    """Defaults <- recipe (with its ``base:`` chain) <- ``key=value`` overrides, validated.

    A recipe's warm-up longer than an overridden ``train.epochs`` (``train.epochs=1``, the first thing people try)
    is shortened to the same fraction of the run, unless the overrides set ``train.warmup_epochs`` themselves; the
    one-line notice goes to ``notices`` (a list), or is issued as a warning when ``notices`` is None.
    """
    raw: dict = {}
    if recipe:
        raw = _load_yaml_chain(resolve_recipe(recipe), seen=())
    return config_with_overrides(raw, overrides, notices)


def config_with_overrides(raw: dict, overrides: typing.Sequence[str] = (), notices: Optional[list] = None) -> Config:
    """``raw`` (a recipe or a checkpoint's stored config) with ``key=value`` overrides, validated; a warm-up the
    overrides made too long is fitted as ``load_config`` says."""
    recipe_raw = {section: dict(raw.get(section) or {}) for section in ("train", "finetune")}
    apply_overrides(raw, overrides)
    for section, cls in (("train", TrainConfig), ("finetune", FinetuneConfig)):
        notice = _fit_warmup(raw, recipe_raw[section], overrides, section, cls)
        if notice and notices is None:
            warnings.warn(notice, stacklevel=3)
        elif notice:
            notices.append(notice)
    return from_dict(Config, raw)


def _fit_warmup(raw: dict, recipe_section: dict, overrides: typing.Sequence[str], section: str,
                cls: type) -> Optional[str]:
    """Shorten a warm-up the user did not set that no longer fits ``<section>.epochs``; returns the notice."""
    set_by_user = {o.split("=", 1)[0].strip() for o in overrides}
    values = raw.get(section)
    if f"{section}.warmup_epochs" in set_by_user or section in set_by_user or not isinstance(values, dict):
        return None
    fields = cls.model_fields
    epochs = values.get("epochs", fields["epochs"].default)
    warmup = values.get("warmup_epochs", fields["warmup_epochs"].default)
    planned = recipe_section.get("epochs", fields["epochs"].default)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (epochs, warmup, planned))
    if not numbers or not 0 < epochs < warmup or planned <= 0:
        return None  # nothing to fit, or a bad value that validation reports as it is
    fitted = round(min(warmup * epochs / planned, epochs), 4)
    values["warmup_epochs"] = fitted
    return (f"{section}.warmup_epochs={warmup:g} is longer than {section}.epochs={epochs:g}: shortened to {fitted:g} "
            f"(the recipe's warm-up fraction, {warmup:g} of {planned:g} epochs); set {section}.warmup_epochs to "
            "choose.")


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``key=value`` strings onto a nested dict in place (validated later by ``from_dict``). A
    ``method.name=...`` that picks another method than ``raw``'s drops ``raw``'s ``method.*`` keys first, wherever
    it stands among the overrides."""
    parsed = [parse_override(ov) for ov in overrides]
    names = [value for key, value in parsed if key == "method.name"]
    if names:
        _switch_method(raw, names[-1])
    for key, value in parsed:
        _set_dotted(raw, key, value)
    return raw


def _load_yaml_chain(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base:'; make one of the files in that chain "
                          "stand on its own (remove its 'base:' line)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: 'base' must name a recipe or a YAML file, got {base!r}")
    base_path = (path.parent / base) if base.endswith((".yaml", ".yml")) else resolve_recipe(base)
    merged = _load_yaml_chain(Path(base_path), seen + (path,))
    section = data.get("method")
    if isinstance(section, dict) and "name" in section:
        _switch_method(merged, section["name"])
    _deep_merge(merged, data)
    return merged


def _method_of(raw: dict) -> Any:
    section = raw.get("method")
    return section.get("name", DEFAULT_METHOD) if isinstance(section, dict) else DEFAULT_METHOD


def _switch_method(raw: dict, name: Any) -> None:
    """A recipe layer or override that picks another method starts ``method.*`` from that method's defaults: the
    ``method.*`` keys set so far belong to the previous method (a DINO recipe on a MoBY base has no queue)."""
    if name != _method_of(raw) and isinstance(raw.get("method"), dict):
        raw["method"] = {}


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
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key" if not key else
                          f"override '{text}': '{key}' is not a dotted key such as train.epochs")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p not in node or node[p] is None:
            node[p] = {}
        elif not isinstance(node[p], dict):
            raise ConfigError(f"override '{key}=...': '{'.'.join(parts[:i + 1])}' is a value, not a section "
                              f"of keys; set it directly ({'.'.join(parts[:i + 1])}=...) or check the key with "
                              "`mobyssl pretrain --help`")
        node = node[p]
    node[parts[-1]] = value


def from_dict(cls, raw: Any):
    """Build model ``cls`` from ``raw``; a ``ConfigError`` names every bad key, the value and the fix."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {raw!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, cls, raw)) from None


def validate(cfg: Section) -> None:
    """Re-check a config built or changed in code (loading and assignments are validated already)."""
    from_dict(type(cfg), to_dict(cfg))


# --------------------------------------------------------------------------- messages


def _loc_key(loc: tuple) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _field_at(cls, loc: tuple, raw: Any) -> tuple[Optional[type], Optional[FieldInfo]]:
    """The model holding the last named key of ``loc`` and that key's field (method options dispatched)."""
    model, info = cls, None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return model, None
        info = model.model_fields[part]
        raw = raw.get(part) if isinstance(raw, dict) else None
        if part == "method" and model is Config:
            name = raw.get("name", DEFAULT_METHOD) if isinstance(raw, dict) else DEFAULT_METHOD
            nxt = METHOD_OPTIONS.get(name, MethodOptions) if isinstance(name, str) else MethodOptions
        else:
            nxt = _model_type(info.annotation)
        if nxt is None:
            break
        model = nxt
    return model, info


def _model_type(tp) -> Optional[type]:
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def describe_type(tp) -> str:
    """``int``, ``float or null``, ``a list of 2 float``, ``one of 'auto', 'off'`` ... for messages and help."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return describe_type(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {describe_type(inner)}"
    if origin is dict or tp is dict:
        return "a mapping (dict)"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping of keys"
    return {"str": "a string", "bool": "true or false"}.get(getattr(tp, "__name__", ""),
                                                           getattr(tp, "__name__", str(tp)))


def describe_constraint(info: FieldInfo) -> str:
    """``> 0``, ``in [0, 1]``, ``>= 1`` ... from a field's declared bounds (for ``--help``)."""
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, at.Gt):
            lo = f"> {_num(m.gt)}"
        elif isinstance(m, at.Ge):
            lo = f">= {_num(m.ge)}"
        elif isinstance(m, at.Lt):
            hi = f"< {_num(m.lt)}"
        elif isinstance(m, at.Le):
            hi = f"<= {_num(m.le)}"
    return ", ".join(x for x in (lo, hi) if x)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _lengths(info: Optional[FieldInfo]) -> tuple[Optional[int], Optional[int]]:
    meta = info.metadata if info is not None else []
    lo = next((m.min_length for m in meta if isinstance(m, at.MinLen)), None)
    hi = next((m.max_length for m in meta if isinstance(m, at.MaxLen)), None)
    return lo, hi


def describe_field(info: FieldInfo) -> str:
    """The declared type of a field, list lengths included (``a list of 2 float``)."""
    text = describe_type(info.annotation)
    lo, hi = _lengths(info)
    if lo is not None and lo == hi and text.startswith("a list of "):
        text = f"a list of {lo} {text[len('a list of '):]}"
    return text


_TYPE_ERRORS = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "string_type",
                "bool_type", "bool_parsing", "list_type", "dict_type", "literal_error", "model_type",
                "model_attributes_type", "none_required", "string_pattern_mismatch"}
_BOUNDS = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
           "less_than_equal": "<= {le}"}


def _explain(err: ValidationError, cls, raw: dict, prefix: str = "") -> str:
    """One line per distinct problem, each naming the dotted key, the value and what is expected."""
    lines: list[str] = []
    seen_keys: set[str] = set()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in
                                                                         ("int", "float", "str", "none"))))
        key = prefix + _loc_key(loc)
        if key in seen_keys:  # a union (e.g. float or null) reports once per member: keep the first
            continue
        seen_keys.add(key)
        value = e.get("input")
        kind = e["type"]
        model, info = _field_at(cls, loc, raw)
        if kind == "extra_forbidden":
            parent = loc[:-1]
            valid = list(model.model_fields) if model is not None and info is None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            here = prefix + (_loc_key(parent) + "." if parent else "")
            hint = f"; did you mean '{here}{close[0]}'?" if close else ""
            scope = f" for method '{_method_name(raw)}'" if here == "method." else ""
            lines.append(f"unknown config key '{key}'{hint} (valid keys here{scope}: "
                         f"{', '.join(here + f for f in valid)})")
        elif kind == "value_error" and str(e.get("ctx", {}).get("error", "")).startswith("config key"):
            lines.append(str(e["ctx"]["error"]))
        elif kind == "finite_number":
            lines.append(f"config key '{key}' must be a finite number, got {_show(value)}")
        elif kind in _BOUNDS:
            bound = _BOUNDS[kind].format(**{k: _num(v) for k, v in e["ctx"].items()})
            lines.append(f"config key '{key}' must be {bound}, got {_show(value)}{_range_hint(info)}")
        elif kind in ("too_short", "too_long"):
            lo, hi = _lengths(info)
            count = lo if lo == hi or kind == "too_short" else hi
            n = f"{count}" if lo == hi else (f"at least {count}" if kind == "too_short" else f"at most {count}")
            lines.append(f"config key '{key}' needs {n} value{'' if count == 1 else 's'}, got {_show(value)}")
        elif kind == "value_error" and str(e["ctx"]["error"]) == _WRONG_TYPE:
            lines.append(f"config key '{key}' expects {_expected(e, loc, info)}, got {_show(value)}")
        elif kind == "value_error":
            lines.append(f"config key '{key}' {e['ctx']['error']}, got {_show(value)}")
        elif kind in _TYPE_ERRORS:
            lines.append(f"config key '{key}' expects {_expected(e, loc, info)}, got {_show(value)}")
        else:
            lines.append(f"config key '{key}': {e['msg']}, got {_show(value)}")
    return "; ".join(lines)


def _show(value) -> str:
    """A value as the user typed it: YAML 1.1 reads '1e-3' as a string, shown here without quotes."""
    if isinstance(value, str):
        try:
            float(value)
            return value
        except ValueError:
            pass
    return repr(value)


def _range_hint(info: Optional[FieldInfo]) -> str:
    return f" (allowed: {describe_constraint(info)})" if info is not None and describe_constraint(info) else ""


def _expected(e: dict, loc: tuple, info: Optional[FieldInfo]) -> str:
    if e["type"] == "literal_error":
        return "one of " + e["ctx"]["expected"].replace(" or ", ", ")
    if info is None:
        return e["msg"]
    if isinstance(loc[-1], int):  # an item of a list
        inner = typing.get_args(_strip(info.annotation))
        return describe_type(inner[0]) if inner else e["msg"]
    return describe_field(info)


def _strip(tp):
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _method_name(raw: dict) -> str:
    m = raw.get("method") if isinstance(raw, dict) else None
    return m.get("name", DEFAULT_METHOD) if isinstance(m, dict) else DEFAULT_METHOD


# --------------------------------------------------------------------------- dumping and introspection


def to_dict(cfg: Section) -> dict:
    return cfg.model_dump(mode="python")


def to_yaml(cfg: Section) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def iter_fields(cfg: Optional[Section] = None, prefix: str = ""):
    """(dotted key, default, help) for every leaf key of ``cfg`` (default: ``Config()``, i.e. MoBY's options)."""
    for key, value, info in iter_field_infos(cfg, prefix):
        yield key, value, info.description or ""


def iter_field_infos(cfg: Optional[Section] = None, prefix: str = ""):
    """(dotted key, value, FieldInfo) for every leaf key of ``cfg``."""
    cfg = Config() if cfg is None else cfg
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            yield from iter_field_infos(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value, info


def on_resume(key: str, cfg: Optional[Config] = None) -> str:
    """What changing ``key`` means for a resumed run: SAFE, SCHEDULE, TRAJECTORY or ARCHITECTURE."""
    for k, _, info in iter_field_infos(cfg):
        if k == key:
            return (info.json_schema_extra or {}).get(RESUME_KEY, TRAJECTORY)
    return TRAJECTORY if not key.startswith("method.") else ARCHITECTURE


def json_schema() -> dict:
    """A JSON schema of recipe files for editors; ``method`` is one of the registered methods' options."""
    schema = Config.model_json_schema()
    defs = schema.setdefault("$defs", {})
    variants = []
    for name in method_names():
        sub = METHOD_OPTIONS[name].model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        sub["properties"]["name"] = {**sub["properties"]["name"], "const": name}
        defs[METHOD_OPTIONS[name].__name__] = sub
        variants.append({"$ref": f"#/$defs/{METHOD_OPTIONS[name].__name__}"})
    schema["properties"]["method"] = {"oneOf": variants, "description": "method.name picks the method's options"}
    schema["properties"]["base"] = {"type": "string", "description": "a recipe name or YAML file this one extends"}
    schema["title"] = "mobyssl recipe"
    return schema
