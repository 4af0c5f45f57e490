"""The benchmark scripts run (smoke size, CPU): they must not rot between device sessions."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_throughput_smoke():
    out = _run("throughput.py", "--device", "cpu", "--backbones", "vit_nano_patch4_32", "--image-size", "32",
               "--batch", "8", "--steps", "2", "--warmup", "1", "--e2e-images", "40", "--workers", "0")
    rows = [line for line in out.splitlines() if line.startswith("| 20")]
    assert len(rows) == 4 and "model-only, eager" in rows[0] and "CPU workers" in rows[1]
    assert "device decode" in rows[2] and "resident" in rows[3]


@pytest.mark.parametrize("sizing", [["--calibration-steps", "2"], ["--epochs", "1"]])
def test_speedrun_smoke(tiny_overrides, sizing):
    out = _run("cifar10_speedrun.py", "--config", "quickstart", "--budgets", "0.05", *sizing,
               "--linear-epochs", "2", *tiny_overrides, "train.device=cpu")
    assert ("calibration:" in out) == ("--calibration-steps" in sizing)
    rows = [line for line in out.splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and rows[0].count("|") == 12
    assert "(epoch " in rows[0].split("|")[-2]  # the in-run k-NN curve


def test_pretrain_knn_smoke(tiny_overrides, tmp_path):
    # --extra-test with the bundled train sample as a second, larger labelled set (1,000 images, not 500); the run
    # goes where output_dir says, and the trained backbone is read from there.
    out = _run("pretrain_knn.py", "--extra-test", "bundled:cifar10-sample-train", *tiny_overrides,
               "train.max_steps=2", f"output_dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "checkpoint.pth").exists()
    assert "random init -> trained" in out and '"trained"' in out
    assert "on the 500 test images" in out and "on the 1000 images of bundled:cifar10-sample-train" in out


def test_gmml_corruption_smoke():
    out = _run("gmml_corruption.py", "--device", "cpu", "--threads", "1", "--repeats", "1", "--batch", "4")
    rows = [line for line in out.splitlines() if line.startswith("| ") and " px |" in line]
    assert len(rows) == 4
    assert all(int(row.split("|")[-2]) >= 1 for row in rows)  # at least the one read back per round of blocks
