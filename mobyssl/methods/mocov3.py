"""MoCo v3 (Chen, Xie and He 2021): the contrastive ViT baseline. Predictions of each view against the other view's
momentum keys, the negatives being the other images of the (global) batch; no queue."""

from __future__ import annotations

from ..config import ARCHITECTURE, Float, Int, MethodOptions, Text, method_name, opt, register_method_options
from ..losses import MoCoV3Loss
from ..models import MoCoMLP, feature_dim
from ..models.mocov3_vit import make_mocov3_vit
from .base import BackboneFn, contrastive_collapse_signs
from .registry import register_method
from .two_views import PredictorMomentumMethod


@register_method_options
class MoCoV3Options(MethodOptions):
    """``method.*`` keys of MoCo v3 (defaults: the official ViT recipe, ``main_moco.py`` with CONFIG.md's flags)."""

    name: Text = method_name("mocov3")
    proj_hidden_dim: Int = opt(4096, "Hidden width of the 3-layer projector and the 2-layer predictor (MoCo v3: "
                                     "4096).", on_resume=ARCHITECTURE, ge=1, le=65536)
    proj_dim: Int = opt(256, "Output width of the projector and the predictor (MoCo v3: 256).",
                        on_resume=ARCHITECTURE, ge=1, le=65536)
    temperature: Float = opt(0.2, "Softmax temperature (MoCo v3's ViT recipe: 0.2); the loss is scaled by 2 x it.",
                             gt=0, le=10)
    momentum: Float = opt(
        0.99, "Base EMA momentum of the key encoder; rises to 1.0 on a cosine over training (MoCo v3: 0.99; the "
        "paper finds 0.99-0.999 about equal).", ge=0, lt=1)
    stop_grad_patch_embed: bool = opt(
        True, "Keep the ViT's patch projection at its random init (MoCo v3's 'stop-grad conv1', on in its ViT "
        "recipes: it avoids the loss spikes of unstable training).", on_resume=ARCHITECTURE)
    sincos_pos_embed: bool = opt(
        True, "A fixed 2-D sin-cos position embedding instead of a learned one (MoCo v3's ViT: on).",
        on_resume=ARCHITECTURE)


@register_method
class MoCoV3(PredictorMomentumMethod):
    """Online: ViT -> projector -> predictor. Keys: ViT -> projector, an EMA of the online pair (parameters only).

    Loss: ``ctr(pred(v1), key(v2)) + ctr(pred(v2), key(v1))`` (:class:`~mobyssl.losses.MoCoV3Loss`). The ViT gets
    MoCo v3's init, sin-cos position table and frozen patch projection (``models.mocov3_vit``). Weight decay applies
    to every parameter, as MoCo v3's single AdamW group does. Evaluated and exported: the online ViT.
    """

    name = "mocov3"
    Options = MoCoV3Options
    decay_every_parameter = True

    def __init__(self, backbone_fn: BackboneFn, drop_path_rate: float = 0.0, target_drop_path_rate: float = 0.0,
                 proj_hidden_dim: int = 4096, proj_dim: int = 256, temperature: float = 0.2, momentum: float = 0.99,
                 stop_grad_patch_embed: bool = True, sincos_pos_embed: bool = True):
        super().__init__()
        self.base_momentum = momentum
        encoder = make_mocov3_vit(backbone_fn(drop_path_rate), sincos_pos_embed, stop_grad_patch_embed)
        dim = feature_dim(encoder)
        projector = MoCoMLP(3, dim, proj_hidden_dim, proj_dim)
        predictor = MoCoMLP(2, proj_dim, proj_hidden_dim, proj_dim)
        self.build_branches(encoder, projector, predictor, backbone_fn(target_drop_path_rate),
                            MoCoMLP(3, dim, proj_hidden_dim, proj_dim))
        self.criterion = MoCoV3Loss(temperature)

    @classmethod
    def from_config(cls, cfg, backbone_fn: BackboneFn) -> "MoCoV3":
        m = cfg.method
        return cls(backbone_fn, cfg.model.drop_path_rate, cfg.model.target_drop_path_rate, m.proj_hidden_dim,
                   m.proj_dim, m.temperature, m.momentum, m.stop_grad_patch_embed, m.sincos_pos_embed)

    def collapse_signs(self, stats: dict[str, float]) -> str | None:
        """``feature_std`` under 0.1, or ``neg_sim`` (mean cosine similarity to the other keys) over 0.9."""
        return contrastive_collapse_signs(stats, "every other one in the batch")
