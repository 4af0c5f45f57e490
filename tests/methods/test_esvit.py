"""EsViT: DINO's student and teacher with a dense head per branch and the view + region loss."""

import pytest
import torch
from helpers import perturb
from torch import nn

from mobyssl.config import load_config
from mobyssl.losses import DenseOutputs, EsViTLoss
from mobyssl.methods import get_method
from mobyssl.methods.dino import DINO, DINOOptions
from mobyssl.methods.esvit import EsViT, EsViTOptions, dense_forward_by_size
from mobyssl.models import create_backbone, patch_tokens
from mobyssl.train.checkpoint import backbone_state_dict, load_checkpoint
from mobyssl.train.trainer import pretrain

OUT, HIDDEN, BOTTLENECK = 24, 16, 8
GLOBAL, LOCAL = 32, 16


def _backbone_fn(calls=None, name="swin_mini_patch2_window4_32", **kw):
    def backbone_fn(dpr, multi_size=False):
        if calls is not None:
            calls.append((dpr, multi_size))
        depth = dict(depths=(2, 1, 1, 1)) if "swin" in name else dict(depth=1)
        return create_backbone(name, drop_path_rate=dpr, multi_size=multi_size, **depth, **kw)

    return backbone_fn


def _esvit(n_crops=4, calls=None, backbone="swin_mini_patch2_window4_32", **kw):
    args = dict(out_dim=OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, n_crops=n_crops)
    args.update(kw)
    return EsViT(_backbone_fn(calls, backbone), **args)


def _views(n_crops=4, b=3, dtype=torch.float32):
    return ([torch.randn(b, 3, GLOBAL, GLOBAL, dtype=dtype) for _ in range(2)]
            + [torch.randn(b, 3, LOCAL, LOCAL, dtype=dtype) for _ in range(n_crops - 2)])


def test_registry_and_options_are_dinos_under_another_name():
    assert get_method("esvit") is EsViT and EsViT.name == "esvit" and issubclass(EsViT, DINO)
    esvit, dino = EsViTOptions().model_dump(), DINOOptions().model_dump()
    assert esvit.pop("name") == "esvit" and dino.pop("name") == "dino"
    assert esvit == dino  # main_esvit.py's defaults are main_dino.py's
    cfg = load_config("quickstart", ["method.name=esvit"])
    assert isinstance(cfg.method, EsViTOptions)


def test_dense_heads_are_independent_of_the_view_heads_and_copied_to_the_teacher():
    torch.manual_seed(0)
    m = _esvit(norm_last_layer=False)
    view, dense = m.student_head.state_dict(), m.student_dense_head.state_dict()
    assert list(view) == list(dense)
    assert not torch.equal(view["mlp.0.weight"], dense["mlp.0.weight"])  # initialised on their own
    for k, v in m.teacher_dense_head.state_dict().items():
        assert torch.equal(v, dense[k]), k
    assert all(not p.requires_grad for p in m.teacher_dense_head.parameters())
    # The student's dense head follows norm_last_layer like the view head; the teacher's last layer is norm-fixed.
    assert m.student_dense_head.last_layer.parametrizations.weight.original0.requires_grad
    assert not m.teacher_dense_head.last_layer.parametrizations.weight.original0.requires_grad


def test_the_dense_heads_last_layer_norm_is_fixed_by_default_as_the_view_heads():
    m = _esvit()  # norm_last_layer left at DINO's default, True
    for head in (m.student_head, m.student_dense_head):
        assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_modules_momentum_pairs_and_heads_include_the_dense_heads():
    m = _esvit()
    assert m.trainable_modules() == [m.student, m.student_head, m.student_dense_head]
    pairs = [(a, b) for a, b in m.momentum_pairs()]
    assert pairs == [(m.student, m.teacher), (m.student_head, m.teacher_head),
                     (m.student_dense_head, m.teacher_dense_head)]
    assert m.student_heads() == [m.student_head, m.student_dense_head]
    assert m.backbone is m.teacher and m.backbone_key == "teacher"


def test_freezing_the_last_layer_holds_both_heads():
    m = _esvit(freeze_last_layer=1, norm_last_layer=False)
    for head in (m.student_head, m.student_dense_head):
        for p in head.parameters():
            p.grad = torch.ones_like(p)
    m.on_after_backward(0)
    for head in (m.student_head, m.student_dense_head):
        for name, p in head.named_parameters():
            assert (p.grad is None) == ("last_layer" in name), name
    m.on_after_backward(1)  # after the frozen epochs nothing is dropped


@pytest.mark.parametrize("backbone, tokens", [("swin_mini_patch2_window4_32", (4, 1)), ("vit_nano_patch4_32", (64, 16))])
def test_dense_forward_by_size_lays_out_tokens_crop_after_crop(backbone, tokens):
    """One pass per run of same-size crops; pooled rows crop-major; in crop c, token t of image b at row
    ``offset_c + b * n_c + t``, the backbone's own tokens (the last-stage Swin map, the ViT's patch tokens)."""
    torch.manual_seed(0)
    model = _backbone_fn(name=backbone)(0.0, multi_size=True).eval()
    views = _views(4, b=2)
    pooled, toks, n_tokens = dense_forward_by_size(model, views)
    n_global, n_local = tokens
    assert n_tokens == [n_global, n_global, n_local, n_local]
    offset = 0
    with torch.no_grad():
        for c, view in enumerate(views):
            features = model.forward_features(view)
            own = patch_tokens(model, features)  # (B, N, C)
            torch.testing.assert_close(pooled[c * 2:(c + 1) * 2], model.forward_head(features, pre_logits=True))
            for b in range(2):
                rows = toks[offset + b * n_tokens[c]: offset + (b + 1) * n_tokens[c]]
                torch.testing.assert_close(rows, own[b])
            offset += 2 * n_tokens[c]
    assert offset == toks.shape[0]


def _crop_by_crop(m, views):
    """Student and teacher DenseOutputs computed one crop at a time (no batching by size)."""
    def branch(backbone, head, dense, crops):
        pooled, tokens, counts = [], [], []
        for v in crops:
            features = backbone.forward_features(v)
            grid = patch_tokens(backbone, features)
            pooled.append(backbone.forward_head(features, pre_logits=True))
            tokens.append(grid.flatten(0, 1))
            counts.append(grid.shape[1])
        pooled, tokens = torch.cat(pooled), torch.cat(tokens)
        return DenseOutputs(head(pooled), dense(tokens), tokens, counts)

    student = branch(m.student, m.student_head, m.student_dense_head, views)
    with torch.no_grad():
        teacher = branch(m.teacher, m.teacher_head, m.teacher_dense_head, views[:2])
    return student, teacher


def test_loss_is_esvit_loss_on_the_crop_by_crop_outputs():
    torch.manual_seed(0)
    m = _esvit(drop_path_rate=0.0, student_temp=0.2, center_momentum=0.7, teacher_temp=0.05).double()
    m.on_step_start(0, 10, 5)
    perturb(m.teacher, m.teacher_head, m.teacher_dense_head)
    with torch.no_grad():
        m.criterion.center.copy_(torch.randn(1, OUT, dtype=torch.float64))
        m.criterion.center_grid.copy_(torch.randn(1, OUT, dtype=torch.float64))
    centres = {k: v.clone() for k, v in m.criterion.state_dict().items()}
    views = _views(4, b=3, dtype=torch.float64)
    student, teacher = _crop_by_crop(m, views)
    out = m(views)

    def hand(s, t, temp=0.05):
        crit = EsViTLoss(OUT, 4, student_temp=0.2, center_momentum=0.7).double()
        crit.load_state_dict(centres)
        return crit(s, t, temp)

    expected = hand(student, teacher)
    assert out.keys() == expected.keys() == {"loss", "view_loss", "region_loss", "teacher_entropy",
                                             "kl_teacher_student"}
    for k in expected:
        assert abs(out[k].item() - expected[k].item()) < 1e-10, k
    # Other wirings give other losses: the heads swapped, the dense head fed the pooled features, no teacher.
    swapped = (DenseOutputs(student.region, student.view, student.tokens, student.n_tokens),
               DenseOutputs(teacher.region, teacher.view, teacher.tokens, teacher.n_tokens))
    assert student.view.shape != student.region.shape  # so the swap is caught by shape checks or values
    with pytest.raises(ValueError):
        hand(*swapped)
    assert abs(hand(student, teacher, 0.04)["loss"].item() - out["loss"].item()) > 1e-6
    via_student = DenseOutputs(student.view[:6].detach(), student.region[:3 * 2 * 4].detach(),
                               student.tokens[:3 * 2 * 4].detach(), student.n_tokens[:2])
    assert abs(hand(student, via_student)["loss"].item() - out["loss"].item()) > 1e-6


def test_only_the_student_backbone_and_both_student_heads_get_gradients():
    torch.manual_seed(0)
    m = _esvit(norm_last_layer=False)
    m(_views())["loss"].backward()
    for mod in (m.teacher, m.teacher_head, m.teacher_dense_head):
        assert all(p.grad is None for p in mod.parameters())
    for mod in (m.student, m.student_head, m.student_dense_head):
        for name, p in mod.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_on_step_end_moves_the_teacher_dense_head_by_the_momentum():
    torch.manual_seed(0)
    m = _esvit(momentum=0.9)
    perturb(m.student_dense_head)
    s = {k: v.clone() for k, v in m.student_dense_head.state_dict().items()}
    t = {k: v.clone() for k, v in m.teacher_dense_head.state_dict().items()}
    momentum = m.on_step_end(1, 100)["momentum"]
    assert momentum == 0.9
    for k, v in m.teacher_dense_head.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, momentum * t[k] + (1 - momentum) * s[k])


def test_from_config_builds_a_swin_with_esvit_windows(tmp_path):
    cfg = load_config("quickstart", ["method.name=esvit", "model.backbone=swin_mini_patch2_window4_32",
                                     "method.out_dim=16", "method.hidden_dim=8", "method.bottleneck_dim=4",
                                     "method.local_crops_number=2", f"method.local_crop_size={LOCAL}",
                                     f"output_dir={tmp_path}/run"])
    calls = []
    m = EsViT.from_config(cfg, _backbone_fn(calls))
    assert isinstance(m, EsViT) and m.n_crops == 4 and calls == [(0.1, True), (0.0, True)]
    blocks = [b for b in m.student.modules() if type(b).__name__ == "SwinTransformerBlock"]
    assert blocks and all(b._attn.__func__.__name__ == "_esvit_attn" for b in blocks)


def test_pretrain_end_to_end_on_the_bundled_sample(tiny_overrides, tmp_path):
    """Two steps through the trainer, a checkpoint whose exported backbone is the teacher's Swin, and the
    view/region terms in metrics.jsonl."""
    tiny = [o for o in tiny_overrides if not o.startswith(("method.", "model."))]
    cfg = load_config("quickstart", [*tiny, f"output_dir={tmp_path}/run", "method.name=esvit", "model.backbone=swin_mini_patch2_window4_32",
                   "model.kwargs={depths: [1, 1, 1, 1], layer_norm_eps: 1.0e-6}", "method.out_dim=64",
                   "method.hidden_dim=32", "method.bottleneck_dim=16", "method.local_crops_number=2",
                   f"method.local_crop_size={LOCAL}", "train.max_steps=2", "train.knn_every=-1",
                   "train.batch_size=16"])
    result = pretrain(cfg)
    assert result["global_step"] == 2
    from helpers import metrics_records

    rows = metrics_records(cfg.output_dir)
    assert len(rows) == 2 and all({"loss", "view_loss", "region_loss"} <= set(r) for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["view_loss"] + 0.5 * r["region_loss"], rel=1e-4)
    state = load_checkpoint(f"{cfg.output_dir}/checkpoint.pth")
    backbone = backbone_state_dict(state)
    assert set(backbone) == {k[len("teacher."):] for k in state["method"] if k.startswith("teacher.")}
    assert torch.equal(backbone["norm.weight"], state["method"]["teacher.norm.weight"])
    assert not torch.equal(backbone["layers.0.blocks.0.attn.qkv.weight"],
                           state["method"]["student.layers.0.blocks.0.attn.qkv.weight"])
    norms = [m for m in create_backbone("swin_mini_patch2_window4_32", depths=(1, 1, 1, 1), layer_norm_eps=1e-6)
             .modules() if isinstance(m, nn.LayerNorm)]
    assert {n.eps for n in norms} == {1e-6}
