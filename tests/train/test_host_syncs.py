"""Between log steps, the training loop never makes the host wait for the device (on a GPU such a wait stops the host
from queueing the next step's work ahead), for every method; SiT's GMML corruption reads back one flag per round of
blocks, by design. Counted on CPU with ``HostSyncCounter``, which sees the ops that would wait on a GPU."""

import traceback

import pytest

from mobyssl.config import load_config
from mobyssl.host_sync import HostSyncCounter
from mobyssl.train import trainer

pytestmark = pytest.mark.slow

RECIPES = ["quickstart", "mocov3_quickstart", "sit_quickstart", "dino_quickstart", "esvit_quickstart"]
SMALL = ["model.backbone=vit_nano_patch4_32", "model.kwargs={depth: 2}", "train.batch_size=32", "train.max_steps=4",
         "train.knn_every=-1", "train.log_every=1000", "train.pictures_every=0", "data.num_workers=2"]


class SyncsByStep(HostSyncCounter):
    """Records, for each wait, how many training steps had begun and the mobyssl line that caused it."""

    def __init__(self):
        super().__init__()
        self.steps_begun = 0
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.total
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.total > before:
            ours = [f for f in traceback.extract_stack() if "/mobyssl/" in f.filename and "host_sync" not in f.filename]
            self.events.append((self.steps_begun, f"{ours[-1].filename.rsplit('/mobyssl/')[-1]}: {ours[-1].line}"))
        return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_steps_between_log_steps_do_not_wait_for_the_device(recipe, tmp_path, monkeypatch):
    overrides = SMALL + (["method.queue_size=128"] if recipe == "quickstart" else [])
    cfg = load_config(recipe, overrides + [f"output_dir={tmp_path / 'run'}"])
    counter = SyncsByStep()
    original = trainer.train_step

    def counted_step(*args, **kwargs):
        counter.steps_begun += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", counted_step)
    with counter:
        trainer.pretrain(cfg)
    assert counter.steps_begun == 4
    # Steps 2 and 3 (and what the loop does between them): no first-step set-up, no final log or checkpoint.
    middle = [where for step, where in counter.events if step in (2, 3)]
    gmml_rounds = [where for where in middle if where.startswith("data/gmml.py")]
    assert [where for where in middle if where not in gmml_rounds] == []
    assert (len(gmml_rounds) >= 4) == (recipe == "sit_quickstart")  # two views a step, a read per round of blocks
