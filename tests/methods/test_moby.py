import math
from collections import Counter

import pytest
import torch
from helpers import random_bn_stats
from torch import nn

from mobyssl.methods import MoBY, get_method
from mobyssl.models import TokenBatchNorm, create_backbone


def _vit(dpr):
    return create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=2)


def _swin_bn(dpr):
    """A tiny Swin with MoBY's BatchNorm before the MLP, so the encoders carry BatchNorm buffers too."""
    return create_backbone("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2), norm_before_mlp="bn", drop_path_rate=dpr)


def _moby(backbone=_vit, **kw):
    args = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=16)
    args.update(kw)
    return MoBY(backbone, **args)


def _views(b=8, dtype=torch.float32):
    return [torch.randn(b, 3, 32, 32, dtype=dtype), torch.randn(b, 3, 32, 32, dtype=dtype)]


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _info_nce_by_hand(q, k, negatives, t):
    """mean_i -log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) ), from the formula."""
    pos = (q * k).sum(1) / t
    neg = torch.exp(q @ negatives.t() / t).sum(1)
    return (torch.log(torch.exp(pos) + neg) - pos).mean()


def test_heads_have_the_paper_shape():
    m = MoBY(lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1))
    lin = [l for l in m.projector.net if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(128, 4096), (4096, 256)]
    lin = [l for l in m.predictor.net if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(256, 4096), (4096, 256)]
    assert isinstance(m.projector.net[1], torch.nn.BatchNorm1d)
    assert m.criterion.queue_1.queue.shape == (4096, 256)


def test_constructor_defaults_are_the_papers():
    """Drop path 0.2 online and 0 in the target, InfoNCE temperature 0.2, base momentum 0.99."""
    rates = []

    def backbone(dpr):
        rates.append(dpr)
        return create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1)

    m = MoBY(backbone, proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=8, queue_size=8)
    assert rates == [0.2, 0.0]  # online first, then the target
    assert m.criterion.temperature == 0.2 and m.base_momentum == 0.99


def test_target_starts_as_exact_copy_of_online_parameters_and_buffers(monkeypatch):
    # With default BatchNorm statistics (0, 1, 0) a copy of the parameters alone would look like a full copy:
    # every BatchNorm here starts with different random statistics, so equal buffers prove they were copied.
    random_bn_stats(monkeypatch)
    torch.manual_seed(0)
    m = _moby(_swin_bn, drop_path_rate=0.2, target_drop_path_rate=0.0)
    for online, target in ((m.encoder, m.encoder_target), (m.projector, m.projector_target)):
        o, t = online.state_dict(), target.state_dict()
        assert list(o) == list(t)
        for k in o:
            assert torch.equal(o[k], t[k]), k
    buffers = [k for k in m.encoder.state_dict() if k.endswith("norm2.bn.running_mean")]
    assert len(buffers) == 2 and int(m.projector.net[1].num_batches_tracked) > 0  # the BatchNorms are really there
    assert not torch.equal(m.projector.net[1].running_mean, m.predictor.net[1].running_mean)  # and random


def test_target_has_its_own_drop_path_rate():
    m = _moby(drop_path_rate=0.3, target_drop_path_rate=0.1)
    online = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.encoder.blocks]
    target = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.encoder_target.blocks]
    assert max(online) == pytest.approx(0.3) and max(target) == pytest.approx(0.1)
    m = _moby(drop_path_rate=0.2, target_drop_path_rate=0.0)
    assert not any(getattr(b.drop_path1, "drop_prob", 0) > 0 for b in m.encoder_target.blocks)


def test_target_branch_receives_no_gradient():
    torch.manual_seed(0)
    m = _moby()
    out = m(_views())
    out["loss"].backward()
    for mod in (m.encoder_target, m.projector_target):
        for p in mod.parameters():
            assert not p.requires_grad and p.grad is None
    for mod in (m.encoder, m.projector, m.predictor):
        assert all(p.grad is not None for p in mod.parameters() if p.requires_grad)
    trainable = {id(p) for mod in m.trainable_modules() for p in mod.parameters()}
    assert not any(id(p) in trainable for p in m.encoder_target.parameters())
    assert not any(id(p) in trainable for p in m.projector_target.parameters())


def test_predictor_has_no_target():
    m = _moby()
    # Frozen (target) parameters are exactly one encoder and one projector; nothing mirrors the predictor.
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert frozen == _numel(m.encoder) + _numel(m.projector)
    assert _numel(m) == 2 * (_numel(m.encoder) + _numel(m.projector)) + _numel(m.predictor)


def test_loss_is_exact_sum_of_two_infonce_terms_from_target_keys_and_online_queries():
    """Hand computation: queries from the online encoder -> projector -> predictor, keys from the target
    encoder -> projector; InfoNCE(q1, k2, queue_2) + InfoNCE(q2, k1, queue_1), T = 0.2, queues as before the step."""
    torch.manual_seed(0)
    m = _moby(drop_path_rate=0.0, temperature=0.2).double()
    with torch.no_grad():  # the target branch differs from the online one, as after some training
        for mod in (m.encoder_target, m.projector_target):
            for p in mod.parameters():
                p.add_(0.2 * torch.randn_like(p))
    x1, x2 = _views(dtype=torch.float64)
    queue_1, queue_2 = m.criterion.queue_1.queue.clone(), m.criterion.queue_2.queue.clone()
    out = m([x1, x2])
    # Train mode: BatchNorms normalise with batch statistics, so running the modules again gives the same values.
    with torch.no_grad():
        q1, q2 = (_unit(m.predictor(m.projector(m.encoder(x)))) for x in (x1, x2))
        k1, k2 = (_unit(m.projector_target(m.encoder_target(x))) for x in (x1, x2))
        k1_online, k2_online = (_unit(m.projector(m.encoder(x))) for x in (x1, x2))
    term_1 = _info_nce_by_hand(q1, k2, queue_2, 0.2)
    term_2 = _info_nce_by_hand(q2, k1, queue_1, 0.2)
    assert abs(out["loss"].item() - (term_1 + term_2).item()) < 1e-10
    # Each alternative wiring gives a clearly different loss, so the match above pins this one.
    alternatives = {
        "one term": 2 * term_1,
        "keys from the online branch": _info_nce_by_hand(q1, k2_online, queue_2, 0.2)
        + _info_nce_by_hand(q2, k1_online, queue_1, 0.2),
        "queues swapped": _info_nce_by_hand(q1, k2, queue_1, 0.2) + _info_nce_by_hand(q2, k1, queue_2, 0.2),
        "same-view keys": _info_nce_by_hand(q1, k1, queue_2, 0.2) + _info_nce_by_hand(q2, k2, queue_1, 0.2),
    }
    for what, value in alternatives.items():
        assert abs(value.item() - out["loss"].item()) > 1e-3, what
    # The target keys of each view entered that view's queue.
    assert int(m.criterion.queue_1.ptr) == 8 and int(m.criterion.queue_2.ptr) == 8
    assert torch.allclose(m.criterion.queue_1.queue[:8], k1, rtol=0, atol=1e-12)
    assert torch.allclose(m.criterion.queue_2.queue[:8], k2, rtol=0, atol=1e-12)
    assert torch.equal(m.criterion.queue_1.queue[8:], queue_1[8:])


def test_each_branch_runs_its_own_modules_once_per_view():
    torch.manual_seed(0)
    m = _moby()
    calls, inputs, outputs = Counter(), {}, {}
    names = ("encoder", "encoder_target", "projector", "projector_target", "predictor")
    for name in names:
        def hook(mod, args, out, name=name):
            calls[name] += 1
            inputs.setdefault(name, []).append(args[0])
            outputs.setdefault(name, []).append(out)
        getattr(m, name).register_forward_hook(hook)
    x1, x2 = _views()
    m([x1, x2])
    assert calls == {name: 2 for name in names}
    for j, x in enumerate((x1, x2)):  # each view on its own through each branch
        assert torch.equal(inputs["encoder"][j], x) and torch.equal(inputs["encoder_target"][j], x)
        assert torch.equal(inputs["projector"][j], outputs["encoder"][j])
        assert torch.equal(inputs["predictor"][j], outputs["projector"][j])
        assert torch.equal(inputs["projector_target"][j], outputs["encoder_target"][j])
    assert not any(o.requires_grad for o in outputs["encoder_target"] + outputs["projector_target"])


def test_on_step_end_moves_every_target_module_by_the_cosine_momentum():
    torch.manual_seed(0)
    m = _moby(_swin_bn, momentum=0.9).double()
    m(_views(dtype=torch.float64))  # the BatchNorm statistics move away from their initial values
    with torch.no_grad():  # online and target differ everywhere
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pairs = {"encoder": (m.encoder, m.encoder_target), "projector": (m.projector, m.projector_target)}
    online = {k: [p.clone() for p in o.parameters()] for k, (o, _) in pairs.items()}
    target = {k: [p.clone() for p in t.parameters()] for k, (_, t) in pairs.items()}
    target_buffers = {k: [b.clone() for b in t.buffers()] for k, (_, t) in pairs.items()}
    predictor = [p.clone() for p in m.predictor.parameters()]

    # A skipped step (apply False, decided on the device) leaves the targets alone.
    m.on_step_end(3, 10, apply=torch.tensor(False))
    for k, (_, t) in pairs.items():
        assert all(torch.equal(a, b) for a, b in zip(target[k], t.parameters())), k

    # The trainer's call (apply: a True 0-d tensor), then a plain call: both apply m(step), computed by hand.
    for step, apply in ((3, torch.tensor(True)), (4, True)):
        logs = m.on_step_end(step, 10, apply=apply)
        mom = 1 - (1 - 0.9) * (math.cos(math.pi * step / 10) + 1) / 2  # 0.92061... at step 3
        assert logs["momentum"] == pytest.approx(mom, abs=1e-15)
        for k, (o, t) in pairs.items():
            new = list(t.parameters())
            assert len(new) == len(target[k]) > 0
            for i, (po, pt, pn) in enumerate(zip(online[k], target[k], new)):
                assert torch.allclose(pn, mom * pt + (1 - mom) * po, rtol=0, atol=1e-12), (k, step, i)
                assert (pn - pt).abs().max() > 1e-4, (k, step, i)  # it did move
            target[k] = [p.clone() for p in new]
            # The online side is untouched; BatchNorm statistics are not averaged (as in MoBY: parameters only).
            assert all(torch.equal(a, b) for a, b in zip(online[k], o.parameters())), k
            assert all(torch.equal(a, b) for a, b in zip(target_buffers[k], t.buffers())), k
    assert all(torch.equal(a, b) for a, b in zip(predictor, m.predictor.parameters()))


def test_bn_variant_target_has_its_own_running_statistics():
    """BatchNorm statistics of the target come from the target's forward passes, not from the online ones."""
    torch.manual_seed(0)
    m = _moby(_swin_bn, drop_path_rate=0.0)
    with torch.no_grad():
        for p in m.encoder_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m(_views())
    bns = [(o, t) for o, t in zip(m.encoder.modules(), m.encoder_target.modules()) if isinstance(o, TokenBatchNorm)]
    assert len(bns) == 2
    for o, t in bns:
        assert int(o.bn.num_batches_tracked) == int(t.bn.num_batches_tracked) == 2  # one per view
        assert not torch.allclose(o.bn.running_mean, t.bn.running_mean)


def test_wrong_number_of_views_is_an_error():
    with pytest.raises(ValueError, match="2 views"):
        _moby()([torch.randn(2, 3, 32, 32)])


def test_registry():
    assert get_method("moby") is MoBY
    with pytest.raises(ValueError, match="moby"):
        get_method("mobi")


def test_from_config_wires_every_option_into_the_method(tiny_cfg):
    """Every method.* and model.* value reaches MoBY (non-default values, so a dropped argument cannot pass)."""
    cfg = tiny_cfg("model.drop_path_rate=0.15", "model.target_drop_path_rate=0.05", "method.proj_hidden_dim=40",
                   "method.proj_dim=24", "method.pred_hidden_dim=36", "method.queue_size=96",
                   "method.temperature=0.3", "method.momentum=0.95")
    rates = []

    def backbone_fn(rate):
        rates.append(rate)
        return _vit(rate)

    m = MoBY.from_config(cfg, backbone_fn)
    assert rates == [0.15, 0.05]  # online encoder, then target encoder
    assert m.base_momentum == 0.95 and m.criterion.temperature == 0.3
    assert m.criterion.queue_1.queue.shape == m.criterion.queue_2.queue.shape == (96, 24)
    linears = lambda head: [layer for layer in head.modules() if isinstance(layer, nn.Linear)]  # noqa: E731
    assert [(lin.in_features, lin.out_features) for lin in linears(m.projector)] == [(m.encoder.num_features, 40),
                                                                                     (40, 24)]
    assert [(lin.in_features, lin.out_features) for lin in linears(m.predictor)] == [(24, 36), (36, 24)]


def test_train_transform_normalises_with_the_configured_statistics(tiny_cfg):
    """data.normalization reaches both views' Normalize (not the ImageNet default)."""
    from torchvision import transforms as T

    from mobyssl.data.transforms import NORMALIZATION

    cfg = tiny_cfg("data.normalization=cifar10")
    views = MoBY.train_transform(cfg)
    normalizers = [t for view in views.transforms for t in view.transforms if isinstance(t, T.Normalize)]
    mean, std = NORMALIZATION["cifar10"]
    assert len(normalizers) == 2 and mean != NORMALIZATION["imagenet"][0]
    assert all(list(n.mean) == list(mean) and list(n.std) == list(std) for n in normalizers)


@pytest.mark.parametrize("std, neg, sign", [
    (0.5, 0.2, None), (0.1, 0.9, None),                      # healthy, and the thresholds themselves
    (0.099, 0.2, "feature_std 0.099 < 0.1"), (0.5, 0.901, "neg_sim 0.901 > 0.9"),
])
def test_collapse_signs_read_the_feature_spread_and_the_queue_similarity(std, neg, sign):
    m = _moby()
    signs = m.collapse_signs({"loss": 1.0, "feature_std": std, "neg_sim": neg, "pos_sim": 0.9})
    assert signs is None if sign is None else sign in signs
    assert m.collapse_signs({"loss": 1.0}) is None


def test_device_transform_makes_two_views_of_the_configured_size_aug_and_statistics(tiny_cfg, monkeypatch):
    import mobyssl.data.gpu_augment as gpu_augment
    from mobyssl.data.transforms import NORMALIZATION

    cfg = tiny_cfg("data.normalization=cifar10", "data.image_size=24", "data.aug.crop_scale=[0.3, 0.7]",
                   "data.aug.blur_prob=[0.9, 0.2]", "data.aug.solarize_prob=[0.1, 0.3]")
    geometry, photometric = [], []
    real = gpu_augment.random_resized_crops

    def recording_crops(images, size, scale, *args, **kw):
        geometry.append((size, tuple(scale)))
        return real(images, size, scale, *args, **kw)

    def grey(x, aug, blur_prob, solarize_prob, generator=None, **_):
        assert aug == cfg.data.aug
        photometric.append((blur_prob, solarize_prob))
        return torch.full_like(x, 0.5)

    monkeypatch.setattr(gpu_augment, "random_resized_crops", recording_crops)
    monkeypatch.setattr(gpu_augment, "photometric", grey)
    views = MoBY.device_transform(cfg)(torch.randint(0, 256, (3, 3, 40, 32), dtype=torch.uint8),
                                      torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 3, 24, 24)] * 2
    assert geometry == [(24, (0.3, 0.7))] * 2 and photometric == [(0.9, 0.1), (0.2, 0.3)]
    mean, std = (torch.tensor(x).view(1, 3, 1, 1) for x in NORMALIZATION["cifar10"])
    for v in views:
        assert torch.allclose(v, ((0.5 - mean) / std).expand_as(v), rtol=0, atol=1e-6)
