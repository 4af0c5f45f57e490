"""BatchNorm synchronised across processes, on any device.

PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only; ``GlobalBatchNorm`` computes the same
statistics with a differentiable all-reduce, so CPU (gloo) runs and tests share the GPU runs'
semantics. On CUDA the native kernel is used. Both keep ``BatchNorm``'s state-dict keys, so
checkpoints move freely between one process and many.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the union of all ranks' batches. Input ``(N, C, *)``."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.ndim))
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics never in bf16/fp16
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device, dtype=xf.dtype)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        with warnings.catch_warnings():  # deprecated for a private API in newer PyTorch; still correct
            warnings.simplefilter("ignore", FutureWarning)
            stats = dist_fn.all_reduce(stats)  # differentiable: gradients flow back to every rank
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.ndim - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in ``module`` by its synchronised form (native on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new
    for name, child in module.named_children():
        new_child = _convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
