"""2 processes with batch B/2 each must train exactly like 1 process with batch B (CPU, gloo).

This is what proves the key gathering into the queues and the synchronised BatchNorms right. In
float64 losses, queues and every weight agree to rounding (1e-9). In float32 AdamW turns rounding
differences in (mathematically) zero gradients, such as those of a bias followed by BatchNorm, into
lr-sized steps, so there the losses and queues are compared and the weights only between ranks.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from mobyssl import distributed as D
from mobyssl.methods import MoBY
from mobyssl.models import create_backbone
from mobyssl.models.sync_bn import convert_sync_batchnorm
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import train_step

B, STEPS = 8, 3
CPU = torch.device("cpu")


def _make_method():
    torch.manual_seed(0)

    def backbone(dpr):
        # Swin with BN before the MLP, so the backbone's BatchNorms are synchronised too. Drop path off.
        return create_backbone("swin_mini_patch2_window4_32", drop_path_rate=0.0, norm_before_mlp="bn",
                               depths=(1, 1, 1, 1))

    return MoBY(backbone, drop_path_rate=0.0, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32,
                queue_size=16, momentum=0.9)


def _views(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]


def _train(rank, world):
    method = _make_method()
    if world > 1:
        method = convert_sync_batchnorm(method, CPU)
    model = D.wrap_ddp(method, CPU)
    opt = build_adamw(method.trainable_modules(), 1e-3, 0.05, (0.9, 0.999), CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    share = B // world
    for step in range(STEPS):
        views = [v[rank * share:(rank + 1) * share] for v in _views(step)]
        out, _ = train_step(model, views, opt, scaler, lr=1e-3, clip_grad=5.0)
        method.on_step_end(step + 1, 10)
        losses.append(D.mean_across_ranks(out["loss"].detach()).item())
    return losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


def _worker(rank, world, port, folder, dtype):
    torch.set_default_dtype(dtype)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        losses, state = _train(rank, world)
        torch.save({"losses": losses, "state": state}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


TOLERANCE = {torch.float64: dict(loss=1e-9, atol=1e-9, rtol=1e-7), torch.float32: dict(loss=1e-4, atol=1e-3, rtol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_two_processes_match_one_process(tmp_path, dtype):
    tol = TOLERANCE[dtype]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        losses_1, state_1 = _train(0, 1)
        initial = _make_method().state_dict()
    finally:
        torch.set_default_dtype(default)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), dtype), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    assert len(losses_1) == STEPS
    for a, b in zip(losses_1, r0["losses"]):
        assert abs(a - b) <= tol["loss"] * abs(a), (losses_1, r0["losses"])
    # Queues hold the gathered keys of the global batch, in the single process's order.
    for key in ("criterion.queue_1.queue", "criterion.queue_2.queue", "criterion.queue_1.ptr"):
        assert torch.allclose(state_1[key].double(), r0["state"][key].double(), atol=tol["atol"], rtol=tol["rtol"]), key
    # Weights, targets (EMA) and BatchNorm statistics after 3 steps; both ranks agree with each other too.
    assert set(state_1) == set(r0["state"])
    for key, value in state_1.items():
        if value.is_floating_point():
            if dtype == torch.float64:
                assert torch.allclose(value, r0["state"][key], atol=tol["atol"], rtol=tol["rtol"]), key
            assert torch.allclose(r0["state"][key], r1["state"][key], atol=1e-6), key
    # The runs did change the weights, so the comparison above is not between initial states.
    assert (state_1["predictor.net.0.weight"] - initial["predictor.net.0.weight"]).abs().max() > 1e-3
