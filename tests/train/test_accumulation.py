import torch
import torch.nn.functional as F

from mobyssl.losses.queue import FeatureQueue
from mobyssl.methods import MoBY
from mobyssl.models import create_backbone
from mobyssl.train.checkpoint import load_checkpoint
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import pretrain, train_step

CPU = torch.device("cpu")


def _moby():
    torch.manual_seed(0)
    fn = lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=0.0, depth=2)  # noqa: E731
    return MoBY(fn, drop_path_rate=0.0, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=16)


def _views(b=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]


def test_accumulation_updates_queues_once_per_step_with_every_micro_batch(monkeypatch):
    m = _moby()
    views = _views(8)
    with torch.no_grad():  # the keys each micro-batch will produce (BN statistics per micro-batch)
        expected = [F.normalize(m.projector_target(m.encoder_target(v)), dim=1)
                    for v in (views[0][:4], views[0][4:])]
    calls = []
    original = FeatureQueue.enqueue
    monkeypatch.setattr(FeatureQueue, "enqueue", lambda self, keys: (calls.append(keys.shape[0]), original(self, keys)))
    opt = build_adamw([m.encoder, m.projector, m.predictor], 1e-3, 0.05, (0.9, 0.999), CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    outputs, ok = train_step(m, views, opt, scaler, lr=1e-3, clip_grad=5.0, accum_steps=2)
    assert bool(ok) and torch.isfinite(outputs["loss"])
    assert calls == [8, 8]  # one enqueue of the whole batch per queue, not one per micro-batch
    assert int(m.criterion.queue_1.ptr) == 8
    assert torch.allclose(m.criterion.queue_1.queue[:8], torch.cat(expected), atol=1e-5)
    assert not m.criterion.defer_updates and not m.criterion._pending


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients():
    views = _views(8)
    m = _moby()
    opt = torch.optim.SGD([p for mod in m.trainable_modules() for p in mod.parameters()], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(m, views, opt, scaler, lr=0.0, clip_grad=None, accum_steps=2)
    got = m.predictor.net[3].weight.grad.clone()
    manual = torch.zeros_like(got)
    for half in (slice(0, 4), slice(4, 8)):
        m2 = _moby()
        m2([v[half] for v in views])["loss"].backward()
        manual += m2.predictor.net[3].weight.grad / 2
    assert torch.allclose(got, manual, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    views = _views(4)
    grads = []
    for ckpt in (False, True):
        m = _moby()
        m.backbone.set_grad_checkpointing(ckpt)
        m(views)["loss"].backward()
        grads.append(m.encoder.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_pretrain_with_accumulation_and_checkpointing(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=2", "train.accum_steps=2", "train.grad_checkpointing=true", "train.knn_every=-1")
    assert pretrain(cfg)["global_step"] == 2
    state = load_checkpoint(f"{cfg.output_dir}/checkpoint.pth")
    assert int(state["method"]["criterion.queue_1.ptr"]) == 64  # 2 steps x batch 32


def test_pretrain_compiled(tiny_cfg):
    # torch.compile on the CPU (the same path GPUs take, with other kernels): a minute of compilation.
    cfg = tiny_cfg("train.max_steps=3", "train.compile=true", "train.knn_every=-1")
    assert pretrain(cfg)["global_step"] == 3
    state = load_checkpoint(f"{cfg.output_dir}/checkpoint.pth")
    assert int(state["method"]["criterion.queue_1.ptr"]) == 96  # in-place queue updates survive compilation
    assert not any(k.startswith("_orig_mod") for k in state["method"])
