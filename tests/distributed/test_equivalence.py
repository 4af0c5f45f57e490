"""2 processes with batch B/2 each must train exactly like 1 process with batch B (CPU, gloo), for every method.

This is what proves the key gathering into MoBY's queues and MoCo v3's in-batch keys (each rank's queries against
every rank's keys, the positives at the rank's offset), DINO's and EsViT's centres (means over the global batch)
and the synchronised BatchNorms right. In
float64 losses, queues and every weight agree to rounding (1e-9). In float32 AdamW turns rounding
differences in (mathematically) zero gradients, such as those of a bias followed by BatchNorm, into
lr-sized steps, so there the losses and queues are compared and the weights only between ranks.
"""

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from mobyssl import distributed as D
from mobyssl.methods import DINO, EsViT, MoBY, MoCoV3, SiT
from mobyssl.models import create_backbone
from mobyssl.models.sync_bn import convert_sync_batchnorm
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import train_step

B, STEPS = 8, 3
CPU = torch.device("cpu")


def _make_method(name):
    torch.manual_seed(0)
    if name == "moby":
        def backbone(dpr):
            # Swin with BN before the MLP, so the backbone's BatchNorms are synchronised too. Drop path off.
            return create_backbone("swin_mini_patch2_window4_32", drop_path_rate=0.0, norm_before_mlp="bn",
                                   depths=(1, 1, 1, 1))

        return MoBY(backbone, drop_path_rate=0.0, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32,
                    queue_size=16, momentum=0.9)
    if name == "sit":
        method = SiT(lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1), out_dim=16,
                     hidden_dim=32, drop_path_rate=0.0, momentum=0.9)
        method.corruption = _top_half_zeroed
        return method
    if name == "mocov3":  # BatchNorms in every head layer, synchronised across ranks
        return MoCoV3(lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1),
                      proj_hidden_dim=32, proj_dim=16, momentum=0.9)
    heads = dict(drop_path_rate=0.0, out_dim=32, hidden_dim=16, bottleneck_dim=8, momentum=0.9, n_crops=4,
                 freeze_last_layer=0, norm_last_layer=False)
    if name == "dino":  # a BatchNorm head, synchronised across ranks
        return DINO(lambda dpr, multi_size=False: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1,
                                                                  multi_size=multi_size), use_bn_in_head=True, **heads)
    return EsViT(lambda dpr, multi_size=False: create_backbone("swin_nano_patch2_window4_32", drop_path_rate=dpr,
                                                               multi_size=multi_size, depths=(1, 1, 1, 1)), **heads)


def _top_half_zeroed(images):
    """A corruption that is the same whatever the batch split: the top half of every image zeroed. SiT's own draws
    per-rank random blocks (replacement sources from the rank's own batch, as the official code does), and its
    reconstruction loss is each rank's mean over its masked pixels, so only equal masks per image make 2 x B/2
    equal 1 x B."""
    mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
    mask[:, : images.shape[2] // 2] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def _views(name, step):
    g = torch.Generator().manual_seed(100 + step)
    sizes = [32, 32] if name in ("moby", "mocov3", "sit") else [32, 32, 16, 16]  # DINO, EsViT: 2 global + 2 local crops
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def _train(rank, world, name="moby"):
    method = _make_method(name)
    if world > 1:
        method = convert_sync_batchnorm(method, CPU)
    model = D.wrap_ddp(method, CPU)
    opt = build_adamw(method.trainable_modules(), 1e-3, 0.05, (0.9, 0.999), CPU, decay_all=method.decay_every_parameter)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    share = B // world
    clip_mode = "global" if name in ("moby", "mocov3") else "per_parameter"  # SiT clips like DINO
    for step in range(STEPS):
        views = [v[rank * share:(rank + 1) * share] for v in _views(name, step)]
        method.on_step_start(step, 10, 5)
        out, _ = train_step(model, views, opt, scaler, lr=1e-3, clip_grad=5.0, clip_mode=clip_mode)
        method.on_step_end(step + 1, 10)
        losses.append(D.mean_across_ranks(out["loss"].detach()).item())
    return losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


def _worker(rank, world, port, folder, dtype, name="moby"):
    torch.set_default_dtype(dtype)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        losses, state = _train(rank, world, name)
        torch.save({"losses": losses, "state": state}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


TOLERANCE = {torch.float64: dict(loss=1e-9, atol=1e-9, rtol=1e-7), torch.float32: dict(loss=1e-4, atol=1e-3, rtol=1e-3)}


# Buffers that the global batch feeds, and a weight that training must have moved, per method.
SHARED = {"moby": ("criterion.queue_1.queue", "criterion.queue_2.queue", "criterion.queue_1.ptr"),
          "dino": ("criterion.center", "student_head.mlp.1.running_mean", "teacher_head.mlp.1.running_var"),
          "esvit": ("criterion.center", "criterion.center_grid"),
          "mocov3": ("projector.net.1.running_mean", "predictor.net.1.running_var", "projector_target.net.7.running_var"),
          "sit": ("student_head.mlp.1.running_mean", "teacher_head.mlp.7.running_var")}
# Zero by construction in exact arithmetic (a batch-wide BatchNorm follows them, so their gradient vanishes): AdamW
# turns rounding noise there into steps of ~1e-10 that differ between the two runs; compared to 1e-8.
NOISE_ONLY = {"dino": r"^(student|teacher)(\.norm\.bias|_head\.mlp\.[03]\.bias|_head\.mlp\.[14]\.running_mean)$",
              # the final norm's bias (the class token then meets a bias-free Linear and a BatchNorm) and the key
              # third of the qkv biases (a softmax does not see a shift shared by all keys)
              "mocov3": r"^encoder(_target)?\.(norm\.bias|blocks\.\d+\.attn\.qkv\.bias)$",
              # the contrastive head's biases before its BatchNorms, and those BatchNorms' running means
              "sit": r"^(student|teacher)_head\.mlp\.([036]\.bias|[147]\.running_mean)$"}
MOVED = {"moby": "predictor.net.0.weight", "dino": "student_head.mlp.0.weight", "esvit": "student_dense_head.mlp.0.weight",
         "mocov3": "encoder.blocks.0.attn.qkv.weight", "sit": "student_decoder.to_pixels.weight"}


@pytest.mark.parametrize("name, dtype", [("moby", torch.float64), ("moby", torch.float32), ("dino", torch.float64),
                                         ("esvit", torch.float64), ("mocov3", torch.float64), ("sit", torch.float64)],
                         ids=["moby-float64", "moby-float32", "dino-float64", "esvit-float64", "mocov3-float64",
                              "sit-float64"])
def test_two_processes_match_one_process(tmp_path, name, dtype):
    tol = TOLERANCE[dtype]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        losses_1, state_1 = _train(0, 1, name)
        initial = _make_method(name).state_dict()
    finally:
        torch.set_default_dtype(default)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), dtype, name), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    assert len(losses_1) == STEPS
    for a, b in zip(losses_1, r0["losses"]):
        assert abs(a - b) <= tol["loss"] * abs(a), (losses_1, r0["losses"])
    # Queues hold the gathered keys of the global batch, in the single process's order; centres and BatchNorm
    # statistics the means over the global batch.
    for key in SHARED[name]:
        assert torch.allclose(state_1[key].double(), r0["state"][key].double(), atol=tol["atol"], rtol=tol["rtol"]), key
    # Weights, targets (EMA) and BatchNorm statistics after 3 steps; both ranks agree with each other too.
    assert set(state_1) == set(r0["state"])
    for key, value in state_1.items():
        if value.is_floating_point():
            if dtype == torch.float64:
                atol = 1e-8 if name in NOISE_ONLY and re.match(NOISE_ONLY[name], key) else tol["atol"]
                assert torch.allclose(value, r0["state"][key], atol=atol, rtol=tol["rtol"]), key
            assert torch.allclose(r0["state"][key], r1["state"][key], atol=1e-6), key
    # The runs did change the weights, so the comparison above is not between initial states.
    assert (state_1[MOVED[name]] - initial[MOVED[name]]).abs().max() > 1e-3
    for key in SHARED[name]:
        if state_1[key].is_floating_point():
            assert not torch.equal(state_1[key], initial[key]), key
