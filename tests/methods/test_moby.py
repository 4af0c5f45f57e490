import pytest
import torch

from mobyssl.methods import MoBY, get_method
from mobyssl.models import create_backbone
from mobyssl.models.momentum import cosine_momentum


def _moby(**kw):
    fn = lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=2)  # noqa: E731
    args = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=16)
    args.update(kw)
    return MoBY(fn, **args)


def _views(b=8):
    return [torch.randn(b, 3, 32, 32), torch.randn(b, 3, 32, 32)]


def test_heads_have_the_paper_shape():
    m = MoBY(lambda dpr: create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1))
    lin = [l for l in m.projector.net if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(128, 4096), (4096, 256)]
    lin = [l for l in m.predictor.net if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(256, 4096), (4096, 256)]
    assert isinstance(m.projector.net[1], torch.nn.BatchNorm1d)
    assert m.criterion.queue_1.queue.shape == (4096, 256)


def test_target_starts_as_copy_with_its_own_drop_path():
    m = _moby(drop_path_rate=0.2, target_drop_path_rate=0.0)
    for (n, a), b in zip(m.encoder.state_dict().items(), m.encoder_target.state_dict().values()):
        assert torch.equal(a, b), n
    online_dp = [b.drop_path1 for b in m.encoder.blocks]
    target_dp = [b.drop_path1 for b in m.encoder_target.blocks]
    assert any(getattr(d, "drop_prob", 0) > 0 for d in online_dp)
    assert not any(getattr(d, "drop_prob", 0) > 0 for d in target_dp)


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


def test_loss_is_sum_of_two_terms_and_queues_fill():
    torch.manual_seed(0)
    m = _moby()
    out = m(_views(8))
    # Two InfoNCE terms over 1 positive + 16 negatives: near 2 * log(17) at initialisation.
    assert 1.0 < out["loss"].item() / (2 * torch.log(torch.tensor(17.0)).item()) < 1.5
    assert int(m.criterion.queue_1.ptr) == 8


def test_on_step_end_applies_the_cosine_momentum():
    torch.manual_seed(0)
    m = _moby(momentum=0.9)
    opt = torch.optim.SGD([p for mod in m.trainable_modules() for p in mod.parameters()], lr=0.5)
    m(_views())["loss"].backward()
    opt.step()
    online = [p.detach().clone() for p in m.encoder.parameters()]
    target = [p.detach().clone() for p in m.encoder_target.parameters()]
    logs = m.on_step_end(3, 10)
    mom = cosine_momentum(3, 10, 0.9)
    assert logs["momentum"] == pytest.approx(mom)
    for o, t, new in zip(online, target, m.encoder_target.parameters()):
        assert torch.allclose(new, mom * t + (1 - mom) * o, atol=1e-6)


def test_wrong_number_of_views_is_an_error():
    with pytest.raises(ValueError, match="2 views"):
        _moby()([torch.randn(2, 3, 32, 32)])


def test_registry():
    assert get_method("moby") is MoBY
    with pytest.raises(ValueError, match="moby"):
        get_method("mobi")
