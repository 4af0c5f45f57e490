"""convert_sync_batchnorm on MoBY with the BatchNorm-before-MLP Swin: every BatchNorm of the method (the
backbones' TokenBatchNorms and the heads') becomes a GlobalBatchNorm with the same state, the same state-dict keys
and the same trainability (the target stays frozen), and computes what it did in one process."""

import copy

import torch
from torch import nn

from mobyssl.methods import MoBY
from mobyssl.models import TokenBatchNorm, create_backbone
from mobyssl.models.sync_bn import GlobalBatchNorm, convert_sync_batchnorm


def _method():
    torch.manual_seed(0)
    return MoBY(lambda dpr: create_backbone("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, window_size=4,
                                            embed_dim=16, depths=(1, 1), num_heads=(1, 2), norm_before_mlp="bn",
                                            drop_path_rate=dpr),
                drop_path_rate=0.0, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=16)


def _views():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]


def test_convert_keeps_state_keys_trainability_and_outputs():
    m = _method()
    m(_views())  # statistics away from their initial values
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
    plain = copy.deepcopy(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in m.named_parameters()}

    synced = convert_sync_batchnorm(m, torch.device("cpu"))
    norms = {n: mod for n, mod in synced.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    token_norms = [mod for mod in synced.modules() if isinstance(mod, TokenBatchNorm)]
    assert len(token_norms) == 4 and all(type(t.bn) is GlobalBatchNorm for t in token_norms)  # 2 blocks x 2 encoders
    assert len(norms) == 4 + 3 and all(type(mod) is GlobalBatchNorm for mod in norms.values())  # + 3 heads
    state = synced.state_dict()
    assert list(state) == list(before)
    for k, v in before.items():
        assert torch.equal(state[k], v), k
    assert {n: p.requires_grad for n, p in synced.named_parameters()} == trainable
    assert not any(p.requires_grad for p in synced.encoder_target.parameters())

    # One process: GlobalBatchNorm is BatchNorm (training mode, then eval mode with the running statistics).
    views = _views()
    torch.testing.assert_close(synced(views)["loss"], plain(views)["loss"], rtol=0, atol=0)
    for k, v in plain.state_dict().items():
        assert torch.equal(synced.state_dict()[k], v), k
    synced.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(synced.encoder_target(views[0]), plain.encoder_target(views[0]))
