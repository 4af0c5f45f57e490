"""MoBY (Xie et al. 2021): MoCo v2's queues and InfoNCE + BYOL's predictor, momentum schedule and augmentations."""

from __future__ import annotations

from ..config import ARCHITECTURE, Float, Int, MethodOptions, Text, method_name, opt, register_method_options
from ..losses import MoBYLoss
from ..models import MLPHead, feature_dim
from .base import BackboneFn, contrastive_collapse_signs
from .registry import register_method
from .two_views import PredictorMomentumMethod


@register_method_options
class MoBYOptions(MethodOptions):
    """``method.*`` keys of MoBY (defaults: the paper's)."""

    name: Text = method_name("moby")
    proj_hidden_dim: Int = opt(4096, "Projector hidden width (MoBY: 4096).", on_resume=ARCHITECTURE, ge=1, le=65536)
    proj_dim: Int = opt(256, "Projector/predictor output width (MoBY: 256).", on_resume=ARCHITECTURE, ge=1, le=65536)
    pred_hidden_dim: Int = opt(4096, "Predictor hidden width (MoBY: 4096).", on_resume=ARCHITECTURE, ge=1, le=65536)
    queue_size: Int = opt(
        4096, "Negatives per view queue (MoBY: 4096). Must be a multiple of the global batch size.",
        on_resume=ARCHITECTURE, ge=1, le=2**24)
    temperature: Float = opt(0.2, "InfoNCE temperature (MoBY: 0.2).", gt=0, le=10)
    momentum: Float = opt(
        0.99, "Base EMA momentum of the target branch; rises to 1.0 on a cosine over training (MoBY: 0.99).",
        ge=0, lt=1)


@register_method
class MoBY(PredictorMomentumMethod):
    """Online: encoder -> projector -> predictor. Target: encoder -> projector, an EMA of the online pair.

    Loss: ``InfoNCE(pred(v1), target(v2), queue_2) + InfoNCE(pred(v2), target(v1), queue_1)``.
    """

    name = "moby"
    Options = MoBYOptions

    def __init__(self, backbone_fn: BackboneFn, drop_path_rate: float = 0.2, target_drop_path_rate: float = 0.0,
                 proj_hidden_dim: int = 4096, proj_dim: int = 256, pred_hidden_dim: int = 4096,
                 queue_size: int = 4096, temperature: float = 0.2, momentum: float = 0.99):
        super().__init__()
        self.base_momentum = momentum
        encoder = backbone_fn(drop_path_rate)
        dim = feature_dim(encoder)
        projector = MLPHead(dim, proj_hidden_dim, proj_dim)
        predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim)
        self.build_branches(encoder, projector, predictor, backbone_fn(target_drop_path_rate),
                            MLPHead(dim, proj_hidden_dim, proj_dim))
        self.criterion = MoBYLoss(proj_dim, queue_size, temperature)

    @classmethod
    def from_config(cls, cfg, backbone_fn: BackboneFn) -> "MoBY":
        m = cfg.method
        return cls(backbone_fn, cfg.model.drop_path_rate, cfg.model.target_drop_path_rate,
                   m.proj_hidden_dim, m.proj_dim, m.pred_hidden_dim, m.queue_size, m.temperature, m.momentum)

    def check_setup(self, global_batch_size: int) -> None:
        self.criterion.check_batch(global_batch_size)

    def collapse_signs(self, stats: dict[str, float]) -> str | None:
        """``feature_std`` under 0.1, or ``neg_sim`` (mean cosine similarity to the queue) over 0.9."""
        return contrastive_collapse_signs(stats, "every queued one")
