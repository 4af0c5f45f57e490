"""SiT: construction, the corrupted student against the clean teacher, the loss wiring, what trains."""

import pytest
import torch
from torch import nn

from mobyssl.config import load_config
from mobyssl.data.gmml import GMMLCorruption
from mobyssl.errors import BackboneError, ConfigError
from mobyssl.losses import SiTLoss
from mobyssl.methods import SiT, get_method
from mobyssl.models import create_backbone
from mobyssl.train.optim import build_adamw
from mobyssl.train.trainer import make_scaler, train_step

CPU = torch.device("cpu")


def _vit(dpr):
    return create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=2)


def _sit(**kw):
    args = dict(out_dim=16, hidden_dim=32, drop_path_rate=0.0)
    args.update(kw)
    return SiT(_vit, **args)


def _cfg(tmp_path, *overrides):
    return load_config("quickstart", ["method.name=sit", "data.num_workers=0", "model.kwargs={depth: 2}",
                                      f"output_dir={tmp_path / 'run'}", *overrides])


def _views(b=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    return [torch.randn(b, 3, 32, 32, generator=g, dtype=dtype) for _ in range(2)]


def test_registry_and_the_official_defaults():
    assert get_method("sit") is SiT and SiT.backbone_key == "teacher"
    opts = SiT.Options()
    assert (opts.out_dim, opts.hidden_dim, opts.head_layers, opts.temperature, opts.lmbda, opts.momentum) == (
        256, 4096, 3, 0.2, 1.0, 0.996)
    assert (opts.drop_perc, opts.drop_replace, opts.drop_align, opts.drop_type) == (0.5, 0.3, 1, ["zeros"])
    assert opts.crop_scale == [0.2, 1.0]
    m = SiT(_vit)
    assert m.corruption == GMMLCorruption() and m.criterion.temperature == 0.2 and m.criterion.lmbda == 1.0
    assert m.student_decoder.to_pixels.kernel_size == (4, 4)  # the backbone's patch


def test_from_config_wires_every_option(tmp_path):
    cfg = _cfg(tmp_path, "model.drop_path_rate=0.15", "model.target_drop_path_rate=0.05", "method.out_dim=24",
               "method.hidden_dim=40", "method.head_layers=2", "method.temperature=0.3", "method.lmbda=5",
               "method.momentum=0.99", "method.drop_perc=0.4", "method.drop_replace=0.2", "method.drop_align=2",
               "method.drop_type=[noise, copy]")
    rates = []

    def backbone_fn(rate):
        rates.append(rate)
        return _vit(rate)

    m = SiT.from_config(cfg, backbone_fn)
    assert rates == [0.15, 0.05]
    assert m.corruption == GMMLCorruption(0.4, 0.2, 2, ("noise", "copy"))
    assert (m.criterion.temperature, m.criterion.lmbda, m.base_momentum) == (0.3, 5.0, 0.99)
    linears = [(x.in_features, x.out_features) for x in m.student_head.modules() if isinstance(x, nn.Linear)]
    assert linears == [(128, 40), (40, 24)]


def test_corruption_settings_are_checked_before_anything_is_built(tmp_path):
    built = []
    cfg = _cfg(tmp_path, "method.drop_perc=0", "method.drop_replace=0")
    with pytest.raises(ConfigError, match=r"method\.drop_perc"):
        SiT.from_config(cfg, lambda dpr: built.append(dpr))
    assert built == []


def test_a_backbone_without_a_class_token_and_patches_is_refused():
    with pytest.raises(BackboneError, match="SiT needs a ViT"):
        SiT(lambda dpr: create_backbone("swin_nano_patch2_window4_32"))


def test_teacher_starts_as_a_copy_and_is_frozen():
    torch.manual_seed(0)
    m = _sit()
    for online, target in m.momentum_pairs():
        so, st = online.state_dict(), target.state_dict()
        assert all(torch.equal(so[k], st[k]) for k in so)
        assert not any(p.requires_grad for p in target.parameters())


def test_the_student_sees_corrupted_views_the_teacher_clean_ones_and_the_loss_is_sits(monkeypatch):
    torch.manual_seed(0)
    m = _sit(lmbda=3.0).double()
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = _views(dtype=torch.float64)
    seen = {}
    real = m.criterion.forward

    def spy(student, teacher, reconstruction, clean, mask):
        seen.update(student=student, teacher=teacher, reconstruction=reconstruction, clean=clean, mask=mask)
        return real(student, teacher, reconstruction, clean, mask)

    monkeypatch.setattr(m.criterion, "forward", spy)
    torch.manual_seed(5)
    out = m([x1, x2])
    torch.manual_seed(5)  # the same corruption again, drawn the same way
    corrupted, masks = zip(*(m.corruption(x) for x in (x1, x2)))
    with torch.no_grad():
        tokens = m.student.forward_features(torch.cat(corrupted))
        student = m.student_head(tokens[:, 0])
        reconstruction = m.student_decoder(tokens[:, 1:])
        teacher = m.teacher_head(m.teacher.forward_features(torch.cat([x1, x2]))[:, 0])
    torch.testing.assert_close(seen["clean"], torch.cat([x1, x2]), rtol=0, atol=0)
    torch.testing.assert_close(seen["mask"], torch.cat(masks), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(seen["student"]), student, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(seen["teacher"]), teacher, rtol=0, atol=1e-12)
    torch.testing.assert_close(seen["reconstruction"], reconstruction, rtol=0, atol=1e-12)
    expected = SiTLoss(0.2, 3.0)(list(student.split(8)), list(teacher.split(8)), reconstruction, torch.cat([x1, x2]),
                                 torch.cat(masks))
    assert abs(out["loss"].item() - expected["loss"].item()) < 1e-10
    assert 0.3 < torch.cat(masks).double().mean() < 0.7  # about half of every view is corrupted
    assert not torch.equal(torch.cat(corrupted), torch.cat([x1, x2]))


def test_a_training_step_trains_the_student_only():
    torch.manual_seed(0)
    m = _sit()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = build_adamw(m.trainable_modules(), 1e-3, 0.04, (0.9, 0.999), CPU)
    train_step(m, _views(), opt, make_scaler(CPU, None), 1e-3, 3.0, clip_mode="per_parameter")
    after = m.state_dict()
    for key in ("student.blocks.0.attn.qkv.weight", "student_head.mlp.0.weight", "student_decoder.to_pixels.weight",
                "student.pos_embed", "student.patch_embed.proj.weight"):
        assert not torch.equal(after[key], before[key]), key
    for key in before:
        if key.startswith("teacher") and "running" not in key and "num_batches" not in key:
            assert torch.equal(after[key], before[key]), key  # the teacher moves only by the EMA


def test_momentum_follows_dinos_iteration_index():
    m = _sit(momentum=0.9)
    assert m.momentum_at(1, 10) == pytest.approx(0.9)  # after the first step: the schedule's first value
    assert m.momentum_at(10, 10) == pytest.approx(1 - 0.1 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 10)).item()) / 2)


def test_wrong_number_of_views_is_an_error():
    with pytest.raises(ValueError, match="exactly 2 views"):
        _sit()(_views()[:1])


def test_train_transform_gives_two_crops_of_the_configured_scale(tmp_path):
    cfg = _cfg(tmp_path, "method.crop_scale=[0.3, 0.9]")
    crops = SiT.crops(cfg)
    assert crops.n_local == 0 and tuple(crops.global_scale) == (0.3, 0.9) and crops.global_size == 32
    assert tuple(crops.global_blur_prob) == tuple(cfg.data.aug.blur_prob)
