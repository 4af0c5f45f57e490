"""The ``mobyssl`` command line, run in-process: exit codes and messages, nothing trained."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mobyssl.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["pretrain", "knn", "linear", "fewshot", "correspondence", "finetune",
                                     "visualize"])
def test_subcommand_help_lists_config_keys(capsys, command):
    with pytest.raises(SystemExit) as ei:
        main([command, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "config keys" in out
    for key in ("train.epochs = 300", "data.train", "model.backbone", "method.queue_size", "knn.k",
                "data.aug.blur_prob = [1.0, 0.1]"):
        assert key in out, key
    assert "examples:" in out and f"mobyssl {command}" in out


@pytest.mark.parametrize("command", ["export", "recipes", "backbones", "methods"])
def test_other_subcommands_have_help(capsys, command):
    with pytest.raises(SystemExit) as ei:
        main([command, "--help"])
    assert ei.value.code == 0
    assert f"usage: mobyssl {command}" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    for command in ("pretrain", "knn", "linear", "export", "recipes"):
        assert command in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["pretrian"])
    assert ei.value.code == 2
    assert "pretrian" in capsys.readouterr().err


def test_version(capsys):
    from mobyssl import __version__

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mobyssl", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: mobyssl" in proc.stdout and "pretrain" in proc.stdout


# --------------------------------------------------------------------------- print-config


def test_print_config_applies_overrides(capsys):
    code, out, err = run(capsys, "pretrain", "--print-config", "train.epochs=7")
    assert code == 0, err
    assert "epochs: 7" in out
    cfg = yaml.safe_load(out)
    assert cfg["train"]["epochs"] == 7
    assert cfg["model"]["backbone"] == "vit_nano_patch4_32"  # the default recipe is quickstart


def test_print_config_with_named_recipe(capsys):
    code, out, _ = run(capsys, "pretrain", "--config", "moby_swin_tiny_bn_in1k", "--print-config",
                       "train.lr=2e-3", "train.amp=off")
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["model"]["norm_before_mlp"] == "bn"
    assert cfg["train"]["epochs"] == 300
    assert cfg["train"]["lr"] == pytest.approx(2e-3)
    assert cfg["train"]["amp"] == "off"


def test_knn_print_config_with_random_init(capsys):
    code, out, _ = run(capsys, "knn", "--config", "quickstart", "--random-init", "--print-config", "knn.k=[5]")
    assert code == 0
    assert yaml.safe_load(out)["knn"]["k"] == [5]


# --------------------------------------------------------------------------- pretrain errors (before training)


def test_unknown_key_suggests_closest(capsys, tmp_path):
    code, out, err = run(capsys, "pretrain", "train.epoch=3", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "train.epochs" in err and "mobyssl pretrain: error" in err
    assert not (tmp_path / "run").exists()


def test_wrong_type_and_bad_choice(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "train.epochs=abc", f"output_dir={tmp_path}")
    assert code == 2 and "train.epochs" in err and "int" in err
    code, _, err = run(capsys, "pretrain", "train.amp=fp8", f"output_dir={tmp_path}")
    assert code == 2 and "train.amp" in err and "'bf16'" in err


def test_unknown_recipe(capsys):
    code, _, err = run(capsys, "pretrain", "--config", "quickstar")
    assert code == 2 and "'quickstart'" in err


def test_invalid_value_is_caught_by_validation(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "train.lr=-1", f"output_dir={tmp_path / 'run'}")
    assert code == 2 and "train.lr" in err
    assert not (tmp_path / "run").exists()


def test_missing_train_data(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "data.train=/nonexistent", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "data.train" in err and "/nonexistent" in err
    assert not (tmp_path / "run").exists()


def test_train_folder_without_images(capsys, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    (data / "readme.txt").write_text("no images here")
    code, _, err = run(capsys, "pretrain", f"data.train={data}", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "data.train" in err and "no images" in err


def test_missing_test_data(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", f"data.test={tmp_path / 'nope'}", f"output_dir={tmp_path / 'run'}",
                       "train.device=cpu")
    assert code == 2 and "data.test" in err


def test_unknown_backbone_suggests(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "model.backbone=swin_tinyy", f"output_dir={tmp_path / 'run'}",
                       "train.device=cpu")
    assert code == 2
    assert "swin_tinyy" in err and "model.backbone" in err
    assert "Did you mean" in err and "'swin_tiny" in err
    assert not (tmp_path / "run").exists()


def test_unknown_method_suggests(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "method.name=mobi", f"output_dir={tmp_path / 'run'}",
                       "train.device=cpu")
    assert code == 2
    assert "method.name" in err and "'moby'" in err


def test_queue_not_multiple_of_batch_fails_before_training(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "pretrain", "method.queue_size=1000", "train.batch_size=128",
                         "data.train=bundled:cifar10-sample-train", f"output_dir={out_dir}",
                         "train.device=cpu", "data.num_workers=0")
    assert code == 2
    assert "method.queue_size=1000" in err and "train.batch_size" in err
    assert not (out_dir / "checkpoint.pth").exists()
    assert not (out_dir / "config.yaml").exists()
    assert "steps/epoch" not in out  # the run banner was never printed


def test_batch_larger_than_dataset(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "train.batch_size=2048", "method.queue_size=2048",
                       f"output_dir={tmp_path / 'run'}", "train.device=cpu")
    assert code == 2
    assert "train.batch_size" in err and "1000 images" in err


# --------------------------------------------------------------------------- knn / linear / export errors


def test_knn_with_garbage_checkpoint_names_the_file(capsys, tmp_path):
    ckpt = tmp_path / "garbage.pth"
    ckpt.write_bytes(random.Random(0).randbytes(4096))  # fixed bytes: see the short payloads below
    code, _, err = run(capsys, "knn", "--checkpoint", str(ckpt))
    assert code == 2
    assert str(ckpt) in err and "cannot read checkpoint" in err


# Single pickle opcodes that make torch.load raise IndexError (b"." STOP on an empty stack), struct.error
# (b"J" BININT without its bytes), KeyError (BINGET of a missing memo entry) or UnicodeDecodeError: each
# must still be reported as an unreadable checkpoint naming the file.
@pytest.mark.parametrize("payload", [b".", b"J", b"h\x00\x00\x00\x00", b"X\x01\x00\x00\x00\xff"],
                         ids=["IndexError", "struct.error", "KeyError", "UnicodeDecodeError"])
def test_knn_with_short_garbage_checkpoint_names_the_file(capsys, tmp_path, payload):
    ckpt = tmp_path / "garbage.pth"
    ckpt.write_bytes(payload)
    code, _, err = run(capsys, "knn", "--checkpoint", str(ckpt))
    assert code == 2
    assert str(ckpt) in err


def test_knn_with_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "knn", "--checkpoint", str(tmp_path / "missing.pth"))
    assert code == 2 and "missing.pth" in err and "does not exist" in err


def test_knn_without_checkpoint(capsys):
    code, _, err = run(capsys, "knn")
    assert code == 2
    assert "--checkpoint" in err


def test_linear_without_checkpoint(capsys):
    code, _, err = run(capsys, "linear", "linear.mode=fast")
    assert code == 2 and "--checkpoint" in err


def test_linear_on_more_blocks_than_the_backbone_has_stops_before_the_data_is_read(capsys, tmp_path):
    code, _, err = run(capsys, "linear", "--config", "quickstart", "--random-init", "--dry-run",
                       "linear.n_last_blocks=5", f"data.test={tmp_path / 'missing'}")
    assert code == 2
    assert "linear.n_last_blocks=5, but the backbone has 4 blocks" in err and "missing" not in err


def test_linear_dry_run_accepts_the_last_four_blocks(capsys):
    code, out, _ = run(capsys, "linear", "--config", "quickstart", "--random-init", "--dry-run",
                       "linear.n_last_blocks=4")
    assert code == 0 and "dry run" in out


def test_fewshot_prints_a_table_and_writes_null_for_the_interval_of_one_draw(capsys, tmp_path):
    import json

    out_file = tmp_path / "fewshot.json"
    code, out, _ = run(capsys, "fewshot", "--config", "quickstart", "--random-init", "fewshot.shots=[1, 5]",
                       "fewshot.trials=1", "--output", str(out_file))
    assert code == 0
    assert "    N   top-1   95% interval" in out and "(one draw: none)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "5 "))]
    assert [r[0] for r in rows] == ["1", "5"]
    written = json.loads(out_file.read_text())  # strict JSON: no NaN
    assert written["fewshot_ci95_1shot"] is None and written["command"] == "fewshot"
    assert float(rows[1][1]) == pytest.approx(written["fewshot_top1_5shot"], abs=0.01)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_fewshot_with_more_shots_than_the_smallest_class_stops_before_any_image_is_read(capsys, monkeypatch,
                                                                                        dry_run):
    from mobyssl.eval import runner

    monkeypatch.setattr(runner, "_features", lambda *a, **k: pytest.fail("features were extracted"))
    code, _, err = run(capsys, "fewshot", "--config", "quickstart", "--random-init", "fewshot.shots=[5, 101]",
                       *dry_run)
    assert code == 2
    assert "fewshot.shots" in err and "N=101" in err and "has 100 images" in err and "data.train=" in err


def test_correspondence_top_k_beyond_the_token_grid_stops_before_the_data_is_read(capsys, tmp_path):
    code, _, err = run(capsys, "correspondence", "--config", "quickstart", "--random-init", "--dry-run",
                       "correspondence.top_k=65", f"data.test={tmp_path / 'missing'}")
    assert code == 2
    assert "correspondence.top_k" in err and "8x8" in err and "top_k=64" in err and "missing" not in err


def test_correspondence_reports_top_k_and_all_token_scores(capsys):
    code, out, _ = run(capsys, "correspondence", "--config", "quickstart", "--random-init", "correspondence.top_k=5")
    assert code == 0
    values = dict(line.split(": ") for line in out.splitlines() if line.startswith("corr_"))
    assert set(values) == {"corr_top5_accuracy", "corr_top5_distance_px", "corr_all_accuracy",
                           "corr_all_distance_px"}
    assert 0 <= float(values["corr_all_accuracy"]) <= 100 and float(values["corr_all_distance_px"]) >= 0


def test_knn_checkpoint_that_is_not_a_dict(capsys, tmp_path):
    import torch

    ckpt = tmp_path / "list.pth"
    torch.save([1, 2, 3], ckpt)
    code, _, err = run(capsys, "knn", "--checkpoint", str(ckpt))
    assert code == 2 and "list.pth" in err


def test_export_with_garbage_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "garbage.pth"
    ckpt.write_bytes(b"not a checkpoint" * 50)
    code, _, err = run(capsys, "export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out.pth"))
    assert code == 2 and "garbage.pth" in err
    assert not (tmp_path / "out.pth").exists()


# --------------------------------------------------------------------------- listings


def test_recipes_lists_every_recipe_with_its_description(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    lines = out.splitlines()
    from mobyssl.config import list_recipes

    names = list_recipes()
    assert len(lines) == len(names)
    for name, line in zip(names, lines):
        assert line.startswith(name)
    (qs,) = [line for line in lines if line.startswith("quickstart")]
    assert "Quickstart" in qs and "#" not in qs  # the first comment line, without its '#'


def test_backbones_lists_presets_and_aliases(capsys):
    code, out, _ = run(capsys, "backbones")
    assert code == 0
    assert "vit_nano_patch4_32" in out and "swin_tiny_patch2_window4_32" in out
    assert "swin_tiny" in out and "swin_tiny_patch4_window7_224" in out
    assert "deit_small" in out


def test_methods_lists_moby(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    (line,) = [ln for ln in out.splitlines() if ln.startswith("moby")]
    assert len(line.split(None, 1)) == 2  # name and a description


# --------------------------------------------------------------------------- schema, help, argument order


def test_config_schema_is_json_with_each_methods_options_and_bounds(capsys):
    import json

    code, out, _ = run(capsys, "config-schema")
    assert code == 0
    schema = json.loads(out)
    method = schema["properties"]["method"]["oneOf"]
    options = {d["properties"]["name"]["const"]: d for d in (schema["$defs"][m["$ref"].rsplit("/", 1)[1]]
                                                             for m in method)}
    assert set(options) == {"moby", "dino", "esvit", "mocov3", "sit"}  # one per registered method, by method.name
    assert options["moby"]["properties"]["queue_size"]["minimum"] == 1
    assert "queue_size" not in options["dino"]["properties"]
    assert options["dino"]["properties"]["teacher_temp"]["exclusiveMinimum"] == 0
    assert options["esvit"]["properties"]["local_blur_prob"]["maximum"] == 1  # EsViT carries DINO's keys
    assert options["mocov3"]["properties"]["stop_grad_patch_embed"]["default"] is True
    assert "queue_size" not in options["mocov3"]["properties"]
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert train["lr"]["exclusiveMinimum"] == 0 and train["min_lr"]["minimum"] == 0
    assert set(schema["$defs"]["AugConfig"]["properties"]) >= {"crop_scale", "blur_prob"}


def test_help_shows_each_keys_range(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.lr = 0.001   (> 0, <= 10)" in out
    assert "method.* keys of method.name=moby:" in out and "method.queue_size = 4096   (>= 1" in out


def test_overrides_after_resume_keep_their_order(capsys):
    # `--resume key=value` is an override, not a checkpoint path; the later of two values wins.
    code, out, err = run(capsys, "pretrain", "--config", "quickstart", "train.epochs=5", "--resume", "train.epochs=7",
                         "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["train"]["epochs"] == 7


def test_stray_arguments_are_errors(capsys):
    code, _, err = run(capsys, "pretrain", "--print-config", "notakeyvalue")
    assert code == 2 and "override 'notakeyvalue' must look like key=value" in err
    with pytest.raises(SystemExit) as ei:
        main(["pretrain", "--print-config", "train.epochs=3", "--no-such-flag"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "mobyssl pretrain: error: unrecognized arguments: --no-such-flag" in err


# --------------------------------------------------------------------------- visualize


def test_visualize_writes_attention_pca_and_retrieval_pngs(capsys, tmp_path):
    from PIL import Image

    out = tmp_path / "pics"
    code, stdout, _ = run(capsys, "visualize", "--config", "quickstart", "--random-init", "--out", str(out),
                          "--num", "2", "--k", "3")
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    heads = [f"test0000_attn_head{j}.png" for j in range(4)]  # the quickstart ViT has 4 heads
    assert set(heads) | {"test0000_pca.png", "test0001_pca.png", "retrieval.png"} <= set(files)
    assert f"wrote {len(files)} files" in stdout
    with Image.open(out / "retrieval.png") as grid:
        grid.verify()
    with Image.open(out / "test0000_pca.png") as pca:
        assert pca.size[1] == 128 and pca.format == "PNG"  # 32 px images drawn at 128 px


def test_visualize_refuses_a_folder_that_holds_files_before_any_work(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "visualize", "--config", "quickstart", "--random-init", "--out", str(tmp_path))
    assert code == 2 and "not an empty folder" in err and str(tmp_path) in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_visualize_names_an_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    code, _, err = run(capsys, "visualize", "--config", "quickstart", "--random-init", "--out", str(tmp_path / "o"),
                       "--images", str(bad))
    assert code == 2 and "broken.jpg" in err
    assert not (tmp_path / "o").exists()


def test_visualize_run_without_metrics_names_the_file(capsys, tmp_path):
    code, _, err = run(capsys, "visualize", "--run", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "metrics.jsonl" in err


def test_visualize_a_swin_draws_pca_without_attention(capsys, tmp_path):
    out = tmp_path / "pics"
    code, stdout, _ = run(capsys, "visualize", "--config", "esvit_quickstart", "--random-init", "--out", str(out),
                          "--num", "1")
    assert code == 0 and "no attention maps" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["test0000_pca.png"]


# --------------------------------------------------------------------------- a new user's first runs


def _unlabelled_folder(root: Path, nested: bool) -> Path:
    import zipfile

    folder = root / "mine"
    images = folder / "photos" if nested else folder  # nested: one folder of photos reads as one class
    images.mkdir(parents=True)
    with zipfile.ZipFile(REPO / "mobyssl" / "data" / "bundled" / "cifar10-sample-train.zip") as z:
        for i, name in enumerate(n for n in z.namelist() if n.endswith(".jpg")):
            if i == 70:
                break
            (images / f"{i}.jpg").write_bytes(z.read(name))
    return folder


@pytest.mark.parametrize("nested", [False, True])
def test_pretraining_on_own_images_runs_without_knn_against_the_bundled_test_split(capsys, tmp_path, nested):
    mine = _unlabelled_folder(tmp_path, nested)
    code, out, _ = run(capsys, "pretrain", f"data.train={mine}", f"output_dir={tmp_path / 'run'}", "--dry-run")
    assert code == 0 and "dry run" in out
    assert "k-NN during training is off" in out and "data.test=<labelled test split>" in out


def test_pretraining_on_own_images_with_a_chosen_test_split_still_fails_clearly(capsys, tmp_path):
    mine = _unlabelled_folder(tmp_path, nested=True)
    test = REPO / "mobyssl" / "data" / "bundled" / "cifar10-sample-test.zip"
    code, _, err = run(capsys, "pretrain", f"data.train={mine}", f"data.test={test}",
                       f"output_dir={tmp_path / 'run'}", "--dry-run")
    assert code == 2 and "different classes" in err


def test_one_epoch_of_the_quickstart_fits_its_warm_up_with_a_note(capsys, tmp_path):
    code, out, err = run(capsys, "pretrain", "train.epochs=1", f"output_dir={tmp_path / 'run'}", "--dry-run")
    assert code == 0 and "x 1 epochs" in out
    assert "mobyssl: note: train.warmup_epochs=3 is longer than train.epochs=1: shortened to 0.1" in err


# --------------------------------------------------------------------------- export: the call that rebuilds it


@pytest.mark.parametrize("recipe, overrides", [
    ("quickstart", []),
    ("mocov3_quickstart", []),
    ("esvit_quickstart", []),  # a Swin with LayerNorm eps 1e-6: the call passes a norm_layer
    ("quickstart", ["model.backbone=swin_nano_patch2_window4_32", "model.norm_before_mlp=bn"]),  # MoBY-1 BN
])
def test_export_prints_and_writes_the_call_that_rebuilds_and_loads_the_backbone(capsys, tmp_path, recipe, overrides):
    import json

    import torch

    from mobyssl.build import build_method
    from mobyssl.config import load_config, to_dict

    cfg = load_config(recipe, overrides)
    method = build_method(cfg)
    ckpt = tmp_path / "trained.pth"
    torch.save({"config": to_dict(cfg), "method": method.state_dict(), "global_step": 7}, ckpt)
    out = tmp_path / "export" / "backbone.pth"
    out.parent.mkdir()
    code, stdout, err = run(capsys, "export", "--checkpoint", str(ckpt), "--output", str(out))
    assert code == 0, err
    recipe_file = json.loads((tmp_path / "export" / "backbone.json").read_text())
    assert recipe_file["load"] in stdout.replace("\n    ", "\n") and recipe_file["step"] == 7
    namespace: dict = {}
    exec(recipe_file["load"], namespace)  # the printed lines, run as a user would: strict load, no key left over
    rebuilt, ours = namespace["model"].eval(), method.backbone.eval()
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ours(x))  # the same function, bit for bit



def _trained_checkpoint(tmp_path, recipe, overrides):
    import torch

    from mobyssl.build import build_method
    from mobyssl.config import load_config, to_dict

    cfg = load_config(recipe, overrides)
    torch.manual_seed(3)
    method = build_method(cfg)
    ckpt = tmp_path / "trained.pth"
    torch.save({"config": to_dict(cfg), "method": method.state_dict(), "global_step": 7}, ckpt)
    return cfg, method, ckpt


# A small Swin whose token maps (16x16, 8x8) the 4x4 window tiles, with shifted blocks in both stages.
SMALL_SWIN = ["model.backbone=swin_tiny_patch4_window7_224", "data.image_size=64",
              "model.kwargs={layer_norm_eps: 1.0e-6, embed_dim: 32, depths: [2, 2], num_heads: [1, 2], window_size: 4}"]


@pytest.mark.parametrize("recipe, overrides", [
    ("quickstart", []),              # ViT -> torchvision.models.VisionTransformer
    ("esvit_quickstart", SMALL_SWIN),  # Swin (EsViT's eps) -> torchvision.models.SwinTransformer
])
def test_export_torchvision_loads_into_torchvisions_own_class_with_the_same_features(capsys, tmp_path, recipe,
                                                                                      overrides):
    import json

    import torch

    cfg, method, ckpt = _trained_checkpoint(tmp_path, recipe, overrides)
    out = tmp_path / "tv.pth"
    code, stdout, err = run(capsys, "export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "torchvision")
    assert code == 0, err
    load = json.loads((tmp_path / "tv.json").read_text())["load"]
    assert "torchvision.models." in load and load in stdout.replace("\n    ", "\n")
    namespace: dict = {}
    exec(load, namespace)  # strict load_state_dict: no missing and no unexpected key
    rebuilt, ours = namespace["model"].eval(), method.backbone.eval()
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = rebuilt(x), ours(x)
    assert theirs.shape == mine.shape
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)  # their attention kernels round differently


def _export_small_swin(capsys, tmp_path, fmt):
    """Export SMALL_SWIN's backbone in ``fmt``: (method, what the file holds, stdout)."""
    import torch

    _, method, ckpt = _trained_checkpoint(tmp_path, "esvit_quickstart", SMALL_SWIN)
    out = tmp_path / f"{fmt}.pth"
    code, stdout, err = run(capsys, "export", "--checkpoint", str(ckpt), "--output", str(out), "--format", fmt)
    assert code == 0, err
    return method, torch.load(out, weights_only=True), stdout


def test_export_official_swin_is_the_original_layout_with_its_buffers(capsys, tmp_path):
    import torch

    from mobyssl.models.layouts import original_swin_to_timm

    method, saved, _ = _export_small_swin(capsys, tmp_path, "official")
    assert list(saved) == ["model"]
    original = saved["model"]
    assert "layers.0.downsample.reduction.weight" in original  # patch merging at the end of stage 0
    assert any(k.endswith("attn.relative_position_index") for k in original)
    assert any(k.endswith("attn_mask") for k in original)
    ours = method.backbone.state_dict()
    back = original_swin_to_timm(original)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("overrides, match", [
    (["model.backbone=swin_nano_patch2_window4_32"], r"--format torchvision: stage \d's \dx\d token map is not a "
                                                      r"multiple of the 4x4 window"),
    (["model.kwargs={no_embed_class: true}"], r"--format torchvision: torchvision's VisionTransformer needs exactly "
                                              r"one class token"),
    ([*SMALL_SWIN, "model.norm_before_mlp=bn"], r"--format torchvision: the MoBY-1 BatchNorm Swin has layers "
                                                r"torchvision's Swin lacks"),
])
def test_export_torchvision_refuses_what_its_classes_cannot_hold(capsys, tmp_path, overrides, match):
    import re

    _, _, ckpt = _trained_checkpoint(tmp_path, "quickstart", overrides)
    out = tmp_path / "tv.pth"
    code, _, err = run(capsys, "export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "torchvision")
    assert code != 0 and re.search(match, err), err
    assert "--format timm" in err and not out.exists()


def test_export_openmmlab_writes_a_state_dict_file_and_says_how_to_load_it(capsys, tmp_path):
    method, saved, stdout = _export_small_swin(capsys, tmp_path, "openmmlab")
    assert list(saved) == ["state_dict"] and len(saved["state_dict"]) == len(method.backbone.state_dict())
    assert "init_cfg=dict(type='Pretrained', checkpoint=" in stdout


def test_export_mmdet_and_mmseg_are_names_of_the_openmmlab_layout(capsys, tmp_path):
    import json

    import torch

    _, method, ckpt = _trained_checkpoint(tmp_path, "esvit_quickstart", SMALL_SWIN)
    files = {}
    for fmt in ("openmmlab", "mmdet", "mmseg"):
        out = tmp_path / f"{fmt}.pth"
        code, _, err = run(capsys, "export", "--checkpoint", str(ckpt), "--output", str(out), "--format", fmt)
        assert code == 0, err
        files[fmt] = torch.load(out, weights_only=True)["state_dict"]
        assert json.loads(out.with_suffix(".json").read_text())["format"] == "openmmlab"
    assert files["mmdet"].keys() == files["mmseg"].keys() == files["openmmlab"].keys()
    assert all(torch.equal(files["mmdet"][k], files["openmmlab"][k]) for k in files["openmmlab"])


def test_reports_name_the_network_each_method_evaluates():
    from mobyssl.cli import _evaluated_network

    assert _evaluated_network({"method": {"name": "moby"}}) == "moby online encoder"
    assert _evaluated_network({"method": {"name": "mocov3"}}) == "mocov3 online encoder"
    assert _evaluated_network({"method": {"name": "sit"}}) == "sit teacher"
    assert _evaluated_network({"method": {"name": "dino"}}) == "dino teacher"
    assert _evaluated_network({"method": {"name": "nope"}}) == "nope method"
