"""Recipes, ``base:`` chains, dotted overrides, type and value validation."""

from __future__ import annotations

import re

import pytest

from mobyssl.config import (
    Config,
    ConfigError,
    iter_fields,
    list_recipes,
    load_config,
    parse_override,
    resolve_recipe,
    to_yaml,
    validate,
)

SHIPPED = [
    "dino_quickstart",
    "dino_vit_small_300ep_in1k",
    "dino_vit_small_cifar10",
    "dino_vit_small_in1k",
    "esvit_quickstart",
    "esvit_swin_cifar10",
    "esvit_swin_tiny_in1k",
    "moby_deit_small_in1k",
    "moby_swin_cifar10",
    "moby_swin_tiny_bn_in1k",
    "moby_swin_tiny_in1k",
    "moby_vit_small_cifar10",
    "mocov3_quickstart",
    "mocov3_vit_small_cifar10",
    "mocov3_vit_small_in1k",
    "quickstart",
    "sit_quickstart",
    "sit_vit_small_cifar10",
    "sit_vit_small_in1k",
    "sit_vit_small_small_data",
]


# --------------------------------------------------------------------------- recipes


def test_list_recipes_has_the_shipped_ones():
    assert set(SHIPPED) <= set(list_recipes())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    validate(cfg)
    assert cfg.output_dir == f"runs/{name}"


def test_recipe_by_name_and_by_path_give_the_same_config():
    path = resolve_recipe("moby_swin_tiny_bn_in1k")
    assert path.is_file() and path.suffix == ".yaml"
    assert load_config(str(path)) == load_config("moby_swin_tiny_bn_in1k")


def test_base_chain_merges_child_over_parent():
    bn = load_config("moby_swin_tiny_bn_in1k")
    assert bn.model.norm_before_mlp == "bn"          # set by the child
    assert bn.train.epochs == 300                    # inherited from moby_swin_tiny_in1k
    assert bn.model.backbone == "swin_tiny_patch4_window7_224"
    assert bn.data.train == "imagenet/train"
    assert bn.output_dir == "runs/moby_swin_tiny_bn_in1k"
    assert load_config("moby_swin_tiny_in1k").model.norm_before_mlp == "ln"


def test_multi_level_base_chain_deep_merges_nested_sections():
    # quickstart -> moby_swin_cifar10 -> moby_swin_tiny_in1k
    q = load_config("quickstart")
    assert q.model.backbone == "vit_nano_patch4_32"       # quickstart
    assert q.data.image_size == 32                        # moby_swin_cifar10
    assert q.data.aug.blur_prob == [0.0, 0.0]             # moby_swin_cifar10, nested two levels deep
    assert q.data.aug.solarize_prob == [0.0, 0.2]         # moby_swin_tiny_in1k, sibling of the above
    assert q.train.weight_decay == 0.05                   # moby_swin_tiny_in1k
    assert q.train.epochs == 30 and q.method.queue_size == 256   # quickstart


def test_user_recipe_file_with_base_by_name_and_by_relative_path(tmp_path):
    child = tmp_path / "mine.yaml"
    child.write_text("base: moby_swin_tiny_bn_in1k\ntrain:\n  epochs: 7\nmodel:\n  drop_path_rate: 0.1\n")
    cfg = load_config(str(child))
    assert cfg.train.epochs == 7
    assert cfg.model.norm_before_mlp == "bn"
    assert cfg.model.drop_path_rate == 0.1
    assert cfg.train.warmup_epochs == 5  # still from the paper recipe

    grandchild = tmp_path / "sub.yml"
    grandchild.write_text("base: mine.yaml\nmethod:\n  queue_size: 512\n")
    cfg2 = load_config(str(grandchild))
    assert cfg2.train.epochs == 7 and cfg2.method.queue_size == 512 and cfg2.model.norm_before_mlp == "bn"


def test_self_including_recipe_is_an_error(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(a))


def test_invalid_yaml_and_non_mapping_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(lst))


def test_unknown_key_in_recipe_file_is_caught(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(str(p))


def test_missing_recipe_file_path():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/dir/recipe.yaml")


def test_unknown_recipe_name_suggests_closest():
    with pytest.raises(ConfigError) as ei:
        load_config("moby_swin_tiny_in1")
    msg = str(ei.value)
    assert "moby_swin_tiny_in1" in msg
    assert "Did you mean 'moby_swin_tiny_in1k'" in msg
    assert "quickstart" in msg  # lists what exists


# --------------------------------------------------------------------------- paper defaults


# The three published fine-tuning recipes the shipped recipes carry (README, "Fine-tuning"):
# (epochs, warm-up, batch, lr, lr reference batch, weight decay, layer decay, random erasing, clip)
FINETUNE_VIT_224 = (100, 5, 1024, 5e-4, 256, 0.05, 0.75, 0.25, None)      # MAE / BEiT
FINETUNE_SWIN_224 = (100, 20, 2048, 1.25e-3, 512, 0.05, 0.9, 0.25, 5.0)   # SimMIM's Swin
FINETUNE_SMALL = (100, 3, 1024, 3e-4, 512, 0.1, 1.0, 0.0, None)           # MoCo v3's CIFAR-10 transfer


@pytest.mark.parametrize("name", [n for n in SHIPPED if "quickstart" not in n])
def test_every_full_recipe_carries_the_finetuning_recipe_of_its_backbone_and_image_size(name):
    c = load_config(name)
    f = c.finetune
    got = (f.epochs, f.warmup_epochs, f.batch_size, f.lr, f.lr_ref_batch, f.weight_decay, f.layer_decay,
           f.random_erasing, f.clip_grad)
    if c.data.image_size <= 96 or name == "sit_vit_small_small_data":
        expected = FINETUNE_SMALL
    elif "swin" in c.model.backbone:
        expected = FINETUNE_SWIN_224
    else:
        expected = FINETUNE_VIT_224
    assert got == pytest.approx(expected)
    assert (f.drop_path, f.label_smoothing, f.mixup, f.cutmix) == pytest.approx((0.1, 0.1, 0.8, 1.0))
    assert f.rand_augment == "rand-m9-mstd0.5-inc1"


@pytest.mark.parametrize("name", [n for n in SHIPPED if "quickstart" in n])
def test_quickstarts_fine_tune_30_epochs_of_128_with_maes_values(name):
    f = load_config(name).finetune
    assert (f.epochs, f.warmup_epochs, f.batch_size) == (30, 5, 128)
    assert (f.lr, f.lr_ref_batch, f.weight_decay, f.layer_decay, f.random_erasing) == pytest.approx(
        (5e-4, 256, 0.05, 0.75, 0.25))


def test_paper_recipe_defaults():
    c = load_config("moby_swin_tiny_in1k")
    t, m, a = c.train, c.method, c.data.aug
    assert t.lr == pytest.approx(1e-3) and t.lr_ref_batch == 512 and t.batch_size == 512
    assert t.weight_decay == pytest.approx(0.05)
    assert t.warmup_epochs == 5
    assert t.epochs == 300
    assert t.clip_grad == pytest.approx(5.0)
    assert t.warmup_lr == pytest.approx(5e-7) and t.min_lr == pytest.approx(5e-6)
    assert m.name == "moby"
    assert m.queue_size == 4096
    assert m.temperature == pytest.approx(0.2)
    assert m.momentum == pytest.approx(0.99)
    assert (m.proj_hidden_dim, m.proj_dim, m.pred_hidden_dim) == (4096, 256, 4096)
    assert c.model.drop_path_rate == pytest.approx(0.2)
    assert c.model.target_drop_path_rate == 0.0
    assert a.blur_prob == [1.0, 0.1]
    assert a.solarize_prob == [0.0, 0.2]
    assert a.color_jitter == [0.4, 0.4, 0.2, 0.1]
    assert a.crop_scale == [0.08, 1.0]
    assert c.data.image_size == 224 and c.data.eval_crop_ratio == 0.875
    assert c.model.backbone == "swin_tiny_patch4_window7_224"
    # The recipe's floats are floats, not YAML strings.
    assert isinstance(t.lr, float) and isinstance(t.warmup_lr, float)


def test_dino_recipe_is_main_dino_defaults():
    """../shared/specs/dino-esvit.md section 1: the official defaults (ViT-S/16, 8 x 64)."""
    c = load_config("dino_vit_small_in1k")
    t, m = c.train, c.method
    assert m.name == "dino" and c.model.backbone == "vit_small_patch16_224"
    assert (m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_layers) == (65536, 2048, 256, 3)
    assert m.norm_last_layer and not m.use_bn_in_head and m.momentum == pytest.approx(0.996)
    assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (m.student_temp, m.center_momentum, m.freeze_last_layer) == (0.1, 0.9, 1)
    assert (m.local_crops_number, m.local_crop_size) == (8, 96) and c.data.image_size == 224
    assert m.global_crop_scale == [0.4, 1.0] and m.local_crop_scale == [0.05, 0.4]
    assert (t.epochs, t.warmup_epochs, t.batch_size) == (100, 10, 512)
    assert t.lr == pytest.approx(5e-4) and t.lr_ref_batch == 256 and t.warmup_lr == 0.0
    assert t.min_lr * t.batch_size / t.lr_ref_batch == pytest.approx(1e-6)  # DINO's unscaled min_lr at batch 512
    assert (t.weight_decay, t.weight_decay_end) == (pytest.approx(0.04), pytest.approx(0.4))
    assert t.clip_grad == 3.0 and t.clip_mode == "per_parameter" and t.betas == [0.9, 0.999]
    assert (c.model.drop_path_rate, c.model.target_drop_path_rate) == (0.1, 0.0)
    # eval_linear.py: 4 class tokens, SGD lr 0.001 per 256 images, 8 GPUs x 128, 100 epochs, no weight decay.
    lc = c.linear
    assert (lc.n_last_blocks, lc.epochs, lc.batch_size, lc.lr_ref_batch) == (4, 100, 1024, 256)
    assert lc.lr == pytest.approx(1e-3) and lc.momentum == 0.9 and lc.weight_decay == 0.0


def test_dino_300_epoch_recipe_is_the_readmes_longer_vit_s_run():
    """DINO's README: --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false on
    16 GPUs x 64; everything else as the 100-epoch recipe."""
    c, base = load_config("dino_vit_small_300ep_in1k"), load_config("dino_vit_small_in1k")
    m = c.method
    assert not m.norm_last_layer and (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (
        0.04, 0.07, 30)
    assert (c.train.epochs, c.train.batch_size) == (300, 1024)
    changed = {"norm_last_layer", "teacher_temp", "warmup_teacher_temp_epochs"}
    assert m.model_dump(exclude=changed) == base.method.model_dump(exclude=changed)
    assert c.train.model_dump(exclude={"epochs", "batch_size"}) == base.train.model_dump(exclude={"epochs", "batch_size"})
    assert (c.model, c.data, c.linear) == (base.model, base.data, base.linear)


@pytest.mark.parametrize("name, base_name, backbone", [("dino_vit_small_cifar10", "dino_vit_small_in1k", "vit_small_patch4_32"),
                                                       ("esvit_swin_cifar10", "esvit_swin_tiny_in1k",
                                                        "swin_tiny_patch2_window4_32")])
def test_cifar10_dino_and_esvit_recipes_scale_the_imagenet_recipe_to_32_px(name, base_name, backbone):
    c, base, moby = load_config(name), load_config(base_name), load_config("moby_swin_cifar10")
    assert c.data == moby.data  # the same data settings as MoBY's CIFAR-10 recipe (no blur at 32 px)
    assert c.model.backbone == backbone and c.model.kwargs == base.model.kwargs
    # Only the crop size and the blur of the local crops change in the method.
    assert (c.method.local_crop_size, c.method.local_blur_prob) == (16, 0.0)
    changed = {"local_crop_size", "local_blur_prob"}
    assert c.method.model_dump(exclude=changed) == base.method.model_dump(exclude=changed)
    assert (c.train.epochs, c.train.warmup_epochs, c.train.batch_size) == (200, 10, 512)
    keep = {"epochs", "warmup_epochs", "batch_size", "knn_every"}
    assert c.train.model_dump(exclude=keep) == base.train.model_dump(exclude=keep)
    assert c.linear == base.linear


def test_esvit_recipe_is_the_official_swin_tiny_recipe():
    """EsViT's README Swin-T command: norm_last_layer false, teacher temperature 0.07 after 30 warm-up epochs,
    300 epochs, 16 x 32 images; Swin-T with LayerNorm eps 1e-6; the rest are main_esvit.py's (= DINO's) defaults."""
    c = load_config("esvit_swin_tiny_in1k")
    t, m = c.train, c.method
    assert m.name == "esvit" and c.model.backbone == "swin_tiny_patch4_window7_224"
    assert c.model.kwargs == {"layer_norm_eps": 1e-6} and c.model.drop_path_rate == 0.1
    assert not m.norm_last_layer and (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (
        0.04, 0.07, 30)
    assert m.out_dim == 65536 and (m.local_crops_number, m.local_crop_size) == (8, 96)
    assert (t.epochs, t.batch_size, t.warmup_epochs) == (300, 512, 10)
    assert t.lr * t.batch_size / t.lr_ref_batch == pytest.approx(1e-3)  # the recipe's peak lr
    assert t.clip_mode == "per_parameter" and t.weight_decay_end == pytest.approx(0.4)


def test_mocov3_recipe_is_the_official_vit_small_recipe():
    """../shared/specs/sit-mocov3.md M1-M5: CONFIG.md's ViT-S flags, the 12-head ViT-S, BYOL's augmentations."""
    c = load_config("mocov3_vit_small_in1k")
    t, m, a = c.train, c.method, c.data.aug
    assert m.name == "mocov3" and c.model.backbone == "vit_small_patch16_224" and c.model.kwargs == {"num_heads": 12}
    assert (m.proj_hidden_dim, m.proj_dim, m.temperature, m.momentum) == (4096, 256, 0.2, 0.99)
    assert m.stop_grad_patch_embed and m.sincos_pos_embed
    assert (t.epochs, t.warmup_epochs, t.batch_size, t.lr_ref_batch) == (300, 40, 4096, 256)
    assert t.lr == pytest.approx(1.5e-4) and t.warmup_lr == 0.0 and t.min_lr == 0.0
    assert t.weight_decay == pytest.approx(0.1) and t.weight_decay_end is None and t.clip_grad is None
    assert t.betas == [0.9, 0.999] and (c.model.drop_path_rate, c.model.target_drop_path_rate) == (0.0, 0.0)
    assert a.crop_scale == [0.08, 1.0] and a.color_jitter == [0.4, 0.4, 0.2, 0.1] and a.color_jitter_prob == 0.8
    assert a.grayscale_prob == 0.2 and a.blur_prob == [1.0, 0.1] and a.solarize_prob == [0.0, 0.2]
    assert c.data.image_size == 224 and c.data.normalization == "imagenet"
    lc = c.linear  # main_lincls.py for ViTs: lr 3 per 256 at batch 1024, 90 epochs, no weight decay
    assert (lc.epochs, lc.batch_size, lc.lr, lc.lr_ref_batch, lc.weight_decay, lc.n_last_blocks) == (
        90, 1024, 3.0, 256, 0.0, 1)
    small = load_config("mocov3_vit_small_cifar10")
    assert small.data == load_config("moby_swin_cifar10").data and small.model.backbone == "vit_small_patch4_32"
    assert small.model.kwargs == {"num_heads": 12} and small.method == c.method


def test_sit_recipe_is_its_authors_current_defaults():
    """../shared/specs/sit-mocov3.md S1-S6: main.py's defaults; README: 4 GPUs x 64; small data: lmbda 5."""
    c = load_config("sit_vit_small_in1k")
    t, m, a = c.train, c.method, c.data.aug
    assert m.name == "sit" and c.model.backbone == "vit_small_patch16_224" and c.model.kwargs == {}
    assert (m.out_dim, m.hidden_dim, m.head_layers, m.temperature, m.lmbda, m.momentum) == (256, 4096, 3, 0.2, 1.0,
                                                                                         0.996)
    assert (m.drop_perc, m.drop_replace, m.drop_align, m.drop_type) == (0.5, 0.3, 1, ["zeros"])
    assert m.crop_scale == [0.2, 1.0] and a.blur_prob == [1.0, 0.1] and a.solarize_prob == [0.0, 0.2]
    assert (t.epochs, t.warmup_epochs, t.batch_size, t.lr_ref_batch) == (800, 10, 256, 256)
    assert t.lr == pytest.approx(5e-4) and t.warmup_lr == 0.0
    assert t.min_lr * t.batch_size / t.lr_ref_batch == pytest.approx(1e-6)
    assert (t.weight_decay, t.weight_decay_end) == (pytest.approx(0.04), pytest.approx(0.1))
    assert t.clip_grad == 3.0 and t.clip_mode == "per_parameter"
    assert (c.model.drop_path_rate, c.model.target_drop_path_rate) == (0.1, 0.0)
    small = load_config("sit_vit_small_small_data")
    assert small.method.lmbda == 5.0 and small.data.image_size == 224
    assert small.method.model_dump(exclude={"lmbda"}) == m.model_dump(exclude={"lmbda"})
    cifar = load_config("sit_vit_small_cifar10")
    assert cifar.data == load_config("moby_swin_cifar10").data and cifar.model.backbone == "vit_small_patch4_32"
    assert cifar.method == small.method


def test_dataclass_defaults_match_paper_recipe():
    """No recipe at all gives the same paper hyper-parameters (the recipe only names data paths)."""
    d = load_config(None)
    p = load_config("moby_swin_tiny_in1k")
    assert d.train == p.train.model_copy(update={"knn_every": d.train.knn_every})
    assert d.method == p.method
    assert d.model == p.model
    assert d.data.aug == p.data.aug


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train.epochs=7", "train.epochs", 7),
        ("train.lr=0.5", "train.lr", 0.5),
        ("knn.k=[10,20]", "knn.k", [10, 20]),
        ("data.test=null", "data.test", None),
        ("output_dir=runs/a=b", "output_dir", "runs/a=b"),  # only the first '=' splits
        ("model.kwargs={embed_dim: 96}", "model.kwargs", {"embed_dim": 96}),
    ],
)
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_parse_override_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")


def test_overrides_are_typed():
    c = load_config("quickstart", [
        "train.epochs=7", "train.lr=1e-3", "train.warmup_epochs=2", "knn.k=[10,20]",
        "data.test=null", "train.clip_grad=null", "data.aug.blur_prob=[0.5,0.25]",
        "model.kwargs={embed_dim: 96}", "train.betas=[0.9,0.95]",
    ])
    assert c.train.epochs == 7 and type(c.train.epochs) is int
    assert c.train.lr == pytest.approx(1e-3) and type(c.train.lr) is float  # YAML 1.1 reads '1e-3' as str
    assert c.train.warmup_epochs == 2.0 and type(c.train.warmup_epochs) is float
    assert c.knn.k == [10, 20]
    assert c.data.test is None
    assert c.train.clip_grad is None
    assert c.data.aug.blur_prob == [0.5, 0.25]
    assert c.model.kwargs == {"embed_dim": 96}
    assert c.train.betas == [0.9, 0.95]
    validate(c)


def test_override_beats_recipe_and_leaves_siblings():
    c = load_config("moby_swin_tiny_in1k", ["data.aug.blur_prob=[0.0,0.0]"])
    assert c.data.aug.blur_prob == [0.0, 0.0]
    assert c.data.aug.solarize_prob == [0.0, 0.2]
    assert c.data.train == "imagenet/train"


def test_kwargs_override_replaces_rather_than_merges(tmp_path):
    p = tmp_path / "k.yaml"
    p.write_text("base: quickstart\nmodel:\n  kwargs: {embed_dim: 64, depth: 2}\n")
    child = tmp_path / "k2.yaml"
    child.write_text("base: k.yaml\nmodel:\n  kwargs: {depth: 3}\n")
    assert load_config(str(child)).model.kwargs == {"depth": 3}


def test_amp_off_override_is_the_string_off():
    # YAML 1.1 reads a bare `off` as False; the Literal field must still accept it.
    assert load_config("quickstart", ["train.amp=off"]).train.amp == "off"
    assert load_config("quickstart", ["train.amp=bf16"]).train.amp == "bf16"


def test_amp_off_in_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("base: quickstart\ntrain:\n  amp: off\n")
    assert load_config(str(p)).train.amp == "off"


def test_to_yaml_round_trips_through_a_recipe_file(tmp_path):
    c = load_config("quickstart", ["train.epochs=7", "train.amp=off", "data.test=null"])
    p = tmp_path / "dump.yaml"
    p.write_text(to_yaml(c))
    assert load_config(str(p)) == c


# --------------------------------------------------------------------------- errors


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", ["train.epoch=3"])
    msg = str(ei.value)
    assert "'train.epoch'" in msg
    assert "did you mean 'train.epochs'" in msg


def test_unknown_top_level_section_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config("quickstart", ["trian.epochs=3"])


def test_unknown_nested_key():
    with pytest.raises(ConfigError, match=r"data\.aug\.blur_pro.*data\.aug\.blur_prob"):
        load_config("quickstart", ["data.aug.blur_pro=[1,1]"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", ["train.epochs=abc"])
    msg = str(ei.value)
    assert "train.epochs" in msg and "expects int" in msg and "'abc'" in msg


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.lr=abc", "train.lr", "float"),
        ("train.epochs=2.5", "train.epochs", "int"),
        ("train.epochs=true", "train.epochs", "int"),
        ("knn.k=5", "knn.k", "a list of int"),
        ("knn.k=[5,x]", "knn.k[1]", "int"),
        ("model.kwargs=3", "model.kwargs", "dict"),
        ("train.clip_grad=big", "train.clip_grad", "float or null"),
        ("data.aug=3", "data.aug", "mapping"),
    ],
)
def test_more_type_errors(override, key, expected):
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [override])
    assert f"'{key}'" in str(ei.value)
    assert expected in str(ei.value)


def test_integral_float_is_accepted_for_int():
    assert load_config("quickstart", ["train.epochs=4.0"]).train.epochs == 4


def test_literal_choice_error_lists_choices():
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", ["train.amp=fp8"])
    msg = str(ei.value)
    assert "train.amp" in msg and "'fp8'" in msg
    for choice in ("'auto'", "'bf16'", "'fp16'", "'off'"):
        assert choice in msg
    with pytest.raises(ConfigError, match=r"model\.norm_before_mlp.*'ln', 'bn'"):
        load_config("quickstart", ["model.norm_before_mlp=gn"])
    with pytest.raises(ConfigError, match=r"linear\.mode"):
        load_config("quickstart", ["linear.mode=true"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.lr=-1e-3"], "train.lr"),
        (["train.lr=0"], "train.lr"),
        (["train.epochs=0"], "train.epochs"),
        (["train.batch_size=-4"], "train.batch_size"),
        (["train.epochs=3", "train.warmup_epochs=5"], "train.warmup_epochs"),
        (["train.warmup_epochs=-1"], "train.warmup_epochs"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.betas=[0.9]"], "train.betas"),
        (["train.clip_grad=0"], "train.clip_grad"),
        (["data.aug.crop_scale=[0.5,0.2]"], "data.aug.crop_scale"),
        (["data.aug.crop_scale=[0.0,1.0]"], "data.aug.crop_scale"),
        (["data.aug.crop_scale=[0.08,1.5]"], "data.aug.crop_scale"),
        (["data.aug.crop_scale=[0.08]"], "data.aug.crop_scale"),
        (["data.aug.color_jitter=[0.4,0.4,0.2]"], "data.aug.color_jitter"),
        (["data.aug.blur_prob=[1.0,1.5]"], "data.aug.blur_prob"),
        (["data.aug.solarize_prob=[0.2]"], "data.aug.solarize_prob"),
        (["data.aug.blur_sigma=[2.0,0.1]"], "data.aug.blur_sigma"),
        (["data.image_size=4"], "data.image_size"),
        (["data.eval_crop_ratio=1.2"], "data.eval_crop_ratio"),
        (["data.eval_crop_ratio=0"], "data.eval_crop_ratio"),
        (["data.normalization=imagenett"], "data.normalization"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["model.drop_path_rate=1.0"], "model.drop_path_rate"),
        (["model.target_drop_path_rate=-0.1"], "model.target_drop_path_rate"),
        (["method.momentum=1.0"], "method.momentum"),
        (["method.temperature=0"], "method.temperature"),
        (["method.queue_size=0"], "method.queue_size"),
        (["knn.k=[]"], "knn.k"),
        (["knn.k=[20,0]"], "knn.k"),
        (["knn.temperature=0"], "knn.temperature"),
        (["linear.epochs=0"], "linear.epochs"),
    ],
)
def test_out_of_range_values_are_refused_at_load_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", overrides)  # types are fine; the values are not
    assert re.search(rf"'{re.escape(key)}(\[\d+\])?'", str(ei.value)), str(ei.value)  # the key, or its item


def test_validate_catches_a_value_set_in_code():
    cfg = load_config("quickstart")
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be >= 1"):
        cfg.train.epochs = 0  # assignments are validated too
    cfg.train.epochs = 5
    validate(cfg)


def test_validate_accepts_edge_values():
    cfg = load_config("quickstart", [
        "train.warmup_epochs=30", "train.epochs=30", "data.eval_crop_ratio=1.0",
        "data.aug.crop_scale=[1.0,1.0]", "data.aug.blur_prob=[0,1]", "train.clip_grad=null",
        "model.drop_path_rate=0.0",
    ])
    validate(cfg)


# --------------------------------------------------------------------------- iter_fields


def test_iter_fields_covers_canonical_keys():
    fields = {key: (default, text) for key, default, text in iter_fields()}
    for key in ("data.train", "data.test", "data.image_size", "model.backbone", "method.name",
                "train.epochs", "train.batch_size", "train.lr", "output_dir", "data.aug.blur_prob",
                "knn.k", "linear.mode"):
        assert key in fields, key
        assert fields[key][1], f"{key} has no help text"
    # Leaves only: sections are expanded, never listed themselves.
    for section in ("data", "data.aug", "model", "method", "train", "knn", "linear"):
        assert section not in fields
    assert fields["train.epochs"][0] == 300
    assert fields["method.name"][0] == "moby"


def test_iter_fields_keys_are_all_settable():
    """Every key --help advertises can be set with a key=value override of its own default."""
    import json

    overrides = [f"{k}={json.dumps(v)}" for k, v, _ in iter_fields()]
    cfg = load_config(None, overrides)
    assert cfg == Config()


def _float_keys():
    from mobyssl.config import iter_field_infos

    return [k for k, v, _ in iter_field_infos() if isinstance(v, float) or
            (isinstance(v, list) and v and isinstance(v[0], float))]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_as_such_for_every_float_key(value):
    keys = _float_keys()
    assert {"train.lr", "train.weight_decay", "data.aug.crop_scale", "method.temperature"} <= set(keys)
    for key in keys:
        v = f"[{value}, {value}]" if isinstance(_default(key), list) else value
        with pytest.raises(ConfigError, match=rf"'{re.escape(key)}(\[\d\])?' must be a finite number"):
            load_config("quickstart", [f"{key}={v}"])


def _default(key):
    from mobyssl.config import iter_field_infos

    return {k: v for k, v, _ in iter_field_infos()}[key]


def test_a_field_with_an_unknown_resume_kind_is_refused_where_it_is_declared():
    """``on_resume`` must be one of the four kinds: a typo would make resume silently ignore changes to the field."""
    from mobyssl.config import RESUME_KINDS, opt

    assert opt(1, "ok", on_resume="safe") is not None
    for bad in ("Safe", "architectures", ""):
        with pytest.raises(ValueError, match=f"on_resume={bad!r} is not one of {', '.join(RESUME_KINDS)}"):
            opt(1, "typo", on_resume=bad)


# --------------------------------------------------------------------------- a short run of a long recipe


def test_a_recipe_warm_up_longer_than_the_run_is_scaled_to_its_fraction_with_a_notice():
    notices = []
    cfg = load_config("quickstart", ["train.epochs=1"], notices)  # the quickstart: 3 of 30 epochs
    assert cfg.train.warmup_epochs == pytest.approx(0.1)
    assert len(notices) == 1 and "train.warmup_epochs=3" in notices[0] and "0.1" in notices[0]
    assert "set train.warmup_epochs" in notices[0]
    # The library call without a list warns instead of changing the recipe silently.
    with pytest.warns(UserWarning, match="shortened to 0.1"):
        load_config("quickstart", ["train.epochs=1"])


def test_a_warm_up_the_user_set_is_never_changed():
    with pytest.raises(ConfigError, match="train.warmup_epochs"):
        load_config("quickstart", ["train.epochs=1", "train.warmup_epochs=3"])
    notices = []
    assert load_config("quickstart", ["train.epochs=10"], notices).train.warmup_epochs == 3 and notices == []


def test_the_default_warm_up_scales_against_the_default_epochs():
    notices = []
    cfg = load_config(None, ["train.epochs=3"], notices)  # defaults: 5 of 300 epochs
    assert cfg.train.warmup_epochs == pytest.approx(5 * 3 / 300, abs=1e-4) and notices
