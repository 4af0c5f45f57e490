"""MoCo v3: construction, the loss wiring against a hand computation, what trains and what does not."""

import pytest
import torch
from torch import nn

from mobyssl.config import load_config
from mobyssl.errors import BackboneError
from mobyssl.methods import MoCoV3, get_method
from mobyssl.models import create_backbone
from mobyssl.models.mocov3_vit import sincos_position_table
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import make_scaler, train_step

CPU = torch.device("cpu")


def _vit(dpr):
    return create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=2)


def _moco(**kw):
    args = dict(proj_hidden_dim=32, proj_dim=16)
    args.update(kw)
    return MoCoV3(_vit, **args)


def _views(b=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    return [torch.randn(b, 3, 32, 32, generator=g, dtype=dtype) for _ in range(2)]


def _cfg(tmp_path, *overrides):
    return load_config("quickstart", ["method.name=mocov3", "data.num_workers=0", "model.kwargs={depth: 2}",
                                      f"output_dir={tmp_path / 'run'}", *overrides])


def _linears(head):
    return [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]


def test_registry_and_the_official_defaults():
    assert get_method("mocov3") is MoCoV3
    m = MoCoV3(lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1))
    assert _linears(m.projector) == [(128, 4096), (4096, 4096), (4096, 256)]
    assert _linears(m.predictor) == [(256, 4096), (4096, 256)]
    assert m.base_momentum == 0.99 and m.criterion.temperature == 0.2
    assert not m.encoder.patch_embed.proj.weight.requires_grad and not m.encoder.pos_embed.requires_grad
    assert MoCoV3.decay_every_parameter and MoCoV3.backbone_key == "encoder"
    opts = MoCoV3.Options()
    assert (opts.proj_hidden_dim, opts.proj_dim, opts.temperature, opts.momentum) == (4096, 256, 0.2, 0.99)
    assert opts.stop_grad_patch_embed and opts.sincos_pos_embed


def test_from_config_wires_every_option(tmp_path):
    cfg = _cfg(tmp_path, "model.drop_path_rate=0.15", "model.target_drop_path_rate=0.05",
                   "method.proj_hidden_dim=40", "method.proj_dim=24", "method.temperature=0.3",
                   "method.momentum=0.95", "method.stop_grad_patch_embed=false", "method.sincos_pos_embed=false")
    rates = []

    def backbone_fn(rate):
        rates.append(rate)
        return _vit(rate)

    m = MoCoV3.from_config(cfg, backbone_fn)
    assert rates == [0.15, 0.05]  # online encoder, then key encoder
    assert m.base_momentum == 0.95 and m.criterion.temperature == 0.3
    assert _linears(m.projector) == [(128, 40), (40, 40), (40, 24)] and _linears(m.predictor) == [(24, 40), (40, 24)]
    assert all(p.requires_grad for p in m.encoder.parameters())  # both ViT options off


def test_key_encoder_starts_as_a_copy_with_the_same_table_and_is_frozen():
    torch.manual_seed(0)
    m = _moco()
    for a, b in ((m.encoder, m.encoder_target), (m.projector, m.projector_target)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any(p.requires_grad for p in b.parameters())
    torch.testing.assert_close(m.encoder_target.pos_embed.data, sincos_position_table(8, 8, 128), rtol=0, atol=0)


def test_loss_is_the_sum_of_both_directions_with_keys_from_the_key_branch():
    torch.manual_seed(0)
    m = _moco().double()
    with torch.no_grad():  # the key branch differs from the online one, as after some training
        for mod in (m.encoder_target, m.projector_target):
            for p in mod.parameters():
                p.add_(0.2 * torch.randn_like(p))
    x1, x2 = _views(dtype=torch.float64)
    out = m([x1, x2])
    n = torch.nn.functional.normalize

    def ctr(q, k):  # 2T x cross-entropy of q . k / T against the same image's key
        logits = n(q, dim=1) @ n(k, dim=1).T / 0.2
        return 0.4 * (torch.logsumexp(logits, 1) - logits.diagonal()).mean()

    with torch.no_grad():  # train mode: BatchNorm uses batch statistics, so running the modules again is exact
        q1, q2 = (m.predictor(m.projector(m.encoder(x))) for x in (x1, x2))
        k1, k2 = (m.projector_target(m.encoder_target(x)) for x in (x1, x2))
        k1_online, k2_online = (m.projector(m.encoder(x)) for x in (x1, x2))
    expected = ctr(q1, k2) + ctr(q2, k1)
    assert abs(out["loss"].item() - expected.item()) < 1e-10
    alternatives = {"one direction twice": 2 * ctr(q1, k2), "same-view keys": ctr(q1, k1) + ctr(q2, k2),
                    "keys from the online branch": ctr(q1, k2_online) + ctr(q2, k1_online),
                    "no predictor": ctr(m.projector(m.encoder(x1)), k2) + ctr(m.projector(m.encoder(x2)), k1)}
    for what, value in alternatives.items():
        assert abs(value.item() - out["loss"].item()) > 1e-3, what


def test_a_training_step_trains_the_online_branch_only_and_keeps_the_frozen_parts():
    torch.manual_seed(0)
    m = _moco()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = build_adamw(m.trainable_modules(), 1e-3, 0.1, (0.9, 0.999), CPU, decay_all=m.decay_every_parameter)
    train_step(m, _views(), opt, make_scaler(CPU, None), 1e-3, None)
    after = m.state_dict()
    for key in ("encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.pos_embed"):
        assert torch.equal(after[key], before[key]), key
    for key in ("encoder.blocks.0.attn.qkv.weight", "encoder.cls_token", "projector.net.0.weight",
                "predictor.net.0.weight", "encoder.norm.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert all(torch.equal(after[k], before[k]) for k in before
               if k.startswith(("encoder_target.", "projector_target.")) and "running" not in k
               and "num_batches" not in k)  # the key branch moves only by the EMA, after the step


def test_weight_decay_reaches_every_trainable_parameter_and_no_frozen_one():
    m = _moco()
    opt = build_adamw(m.trainable_modules(), 1e-3, 0.1, (0.9, 0.999), CPU, decay_all=m.decay_every_parameter)
    decayed, plain = opt.param_groups
    trainable = [p for mod in m.trainable_modules() for p in mod.parameters() if p.requires_grad]
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == len(trainable) and plain["params"] == []
    assert {id(p) for p in decayed["params"]} == {id(p) for p in trainable}
    assert id(m.encoder.patch_embed.proj.weight) not in {id(p) for p in decayed["params"]}
    assert any(p.ndim == 1 for p in decayed["params"])  # biases and norms too, as MoCo v3's single group


def test_wrong_number_of_views_is_an_error():
    with pytest.raises(ValueError, match="exactly 2 views"):
        _moco()(_views()[:1])


def test_a_swin_needs_both_vit_options_off(tmp_path):
    cfg = _cfg(tmp_path, "model.backbone=swin_nano_patch2_window4_32", "model.kwargs={}")
    with pytest.raises(BackboneError, match=r"method\.sincos_pos_embed"):
        get_method("mocov3").from_config(cfg, lambda dpr: create_backbone("swin_nano_patch2_window4_32"))
    cfg = _cfg(tmp_path, "method.sincos_pos_embed=false", "method.stop_grad_patch_embed=false")
    m = get_method("mocov3").from_config(cfg, lambda dpr: create_backbone("swin_nano_patch2_window4_32"))
    assert m([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])["loss"].isfinite()


@pytest.mark.parametrize("std, neg, sign", [(0.05, 0.1, "feature_std 0.050 < 0.1"),
                                            (0.8, 0.95, "neg_sim 0.950 > 0.9: every image looks like every other one"),
                                            (0.8, 0.1, None)])
def test_collapse_signs(std, neg, sign):
    got = _moco().collapse_signs({"feature_std": std, "neg_sim": neg})
    assert got == sign if sign is None else sign in got


