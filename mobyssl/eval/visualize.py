"""Pictures of what a backbone learned: DINO's CLS attention maps, PCA of patch features, retrieval grids and the
training curves of a run.

The computing functions take and return tensors and are I/O-free; the ``save_*`` functions write PNGs.
Images go in as the model sees them (normalised ``(B, 3, H, W)``) together with the ``normalization`` that made
them (a preset of ``data.transforms.NORMALIZATION`` or a ``(mean, std)`` pair), which is undone for display.
Tiny images (32 px) are enlarged by a whole factor, nearest-neighbour, so each tile is at least ``min_side`` px.
matplotlib is imported only where a colour map or a plot is drawn, and only through its object API (Agg canvas):
nothing here touches pyplot or the global backend.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..data.transforms import NORMALIZATION
from ..errors import BackboneError, DataError, RunDirError
from ..models.backbones import patch_sides
from ..runtime import eval_mode
from .correspondence import token_grid

Normalization = Union[str, tuple[Sequence[float], Sequence[float]]]

GAP = 4  # px between the tiles of a strip or grid
CAPTION_HEIGHT = 16  # px of the caption band under each retrieval tile
MATCH_COLOUR, MISMATCH_COLOUR, QUERY_COLOUR, UNKNOWN_COLOUR = (0, 170, 0), (220, 0, 0), (30, 90, 230), (128, 128, 128)
PANEL_INCHES, DPI = (4.0, 3.0), 100  # one training-curve panel: 400 x 300 px


# ----------------------------------------------------------------------------------------------------------------
# Computation (no I/O)
# ----------------------------------------------------------------------------------------------------------------

def _vit_last_attention(vit: nn.Module) -> nn.Module:
    """The last block's attention module of a timm ViT with a class token, or a ``BackboneError`` saying why not."""
    blocks = getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise BackboneError(f"attention maps need a ViT backbone (blocks of global self-attention with a class token); "
                            f"{type(vit).__name__} has none. Use a ViT backbone (model.backbone), or the PCA pictures, "
                            "which work for any backbone, Swin included.")
    if getattr(vit, "cls_token", None) is None:
        raise BackboneError(f"attention maps are the class token's attention, and this {type(vit).__name__} has no "
                            "class token (class_token=False). Use a ViT with a class token, or the PCA pictures.")
    return attn


def last_self_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's softmaxed self-attention ``(B, heads, T, T)``, ``T = prefix tokens + patches``.

    timm computes attention fused (the probabilities never exist), so they are recomputed from the last attention
    module's input, caught by a forward pre-hook that is removed afterwards: ``softmax(q k^T * scale)`` with the
    module's own ``qkv``, ``q_norm``/``k_norm`` and ``scale``. Runs in eval mode without gradients.
    """
    attn = _vit_last_attention(vit)
    caught = []
    handle = attn.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    try:
        with eval_mode(vit):
            vit.forward_features(images)
            x = caught[-1]
            batch, tokens, _ = x.shape
            qkv = attn.qkv(x)
            head_dim = qkv.shape[-1] // (3 * attn.num_heads)
            q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
            k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
            scale = getattr(attn, "scale", head_dim ** -0.5)
            return ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)
    finally:
        handle.remove()


def cls_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINO's attention maps ``(B, heads, h, w)``: the class token's row of the last block's attention over the patch
    keys, on the ``h x w`` patch grid of ``images`` ``(B, 3, H, W)`` (``h = H // patch``).

    Each map holds the probabilities given to the patches, so it sums to 1 minus the weight the class token gives to
    the prefix tokens (itself and any register / distillation tokens). ``BackboneError`` for a non-ViT.
    """
    probs = last_self_attention(vit, images)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    patch_h, patch_w = patch_sides(vit)
    h, w = images.shape[-2] // patch_h, images.shape[-1] // patch_w
    row = probs[:, :, 0, prefix:]
    if row.shape[-1] != h * w:
        raise BackboneError(f"{row.shape[-1]} patch tokens do not fill the {h}x{w} grid of {tuple(images.shape[-2:])} "
                            f"px images with {patch_h}x{patch_w} px patches.")
    return row.reshape(*row.shape[:2], h, w)


def threshold_masks(attn: torch.Tensor, t: float) -> torch.Tensor:
    """DINO's masks: per map ``(..., h, w)``, the smallest set of patches holding at least fraction ``t`` of its
    mass (renormalised to 1 over the map), as a bool tensor of ``attn``'s shape.

    A patch is kept when the mass of the patches strictly above it in descending order is below ``t``: the top
    patches are taken until they hold ``t``. ``t = 0`` keeps nothing, ``t = 1`` every patch with non-zero mass.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"the attention threshold is a fraction of the mass in [0, 1], got {t}")
    flat = attn.flatten(-2).double()
    flat = flat / flat.sum(-1, keepdim=True)
    ranked, order = flat.sort(dim=-1, descending=True)
    mass_above = ranked.cumsum(-1) - ranked
    keep_ranked = (mass_above < t) & (ranked > 0)
    keep = torch.empty_like(keep_ranked).scatter_(-1, order, keep_ranked)
    return keep.reshape(attn.shape)


def feature_grid(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch features ``(B, h, w, C)`` float32 of any timm ViT or Swin (``correspondence.token_grid``), in eval
    mode without gradients: a ViT's patch tokens on its ``H // patch`` grid, a Swin's last-stage map."""
    with eval_mode(backbone):
        return token_grid(backbone, images).float()


def pca_rgb(tokens_grid: torch.Tensor) -> torch.Tensor:
    """The first three principal components of ``(B, h, w, C)`` tokens as RGB ``(B, h, w, 3)`` in [0, 1].

    The PCA is fitted on all tokens of the batch together, so a colour means the same across its images. Each
    component is min-max scaled over the batch; its sign is fixed so its largest loading is positive (the picture
    does not flip between runs). Components that do not exist (fewer than 3 channels or tokens) or carry no
    variance (a spread under ``1e3 * eps`` of the input dtype times the first one's: rounding noise) are 0.
    """
    *lead, channels = tokens_grid.shape
    x = tokens_grid.reshape(-1, channels).double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:3]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    signs[signs == 0] = 1
    proj = x @ (components * signs).T
    low, span = proj.min(0).values, proj.max(0).values - proj.min(0).values
    # A component without variance (constant or rank-deficient tokens) spans only the input's rounding noise: show
    # it as 0, not as that noise stretched to [0, 1].
    noise = 1e3 * torch.finfo(tokens_grid.dtype).eps if tokens_grid.dtype.is_floating_point else 1e-9
    flat = span <= noise * span.max().clamp_min(1e-30)
    scaled = torch.where(flat, torch.zeros_like(proj), (proj - low) / span.clamp_min(1e-300))
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    rgb[:, :scaled.shape[1]] = scaled
    return rgb.float().reshape(*lead, 3)


def nearest_neighbours(query_features: torch.Tensor, bank_features: torch.Tensor, k: int,
                       exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar bank rows of each query: ``(similarities, indices)``, both ``(Q, k)``, best first.

    ``query_features`` ``(Q, D)``, ``bank_features`` ``(N, D)``. ``exclude`` ``(Q,)``: a bank index per query to leave
    out (the query itself, when the queries come from the bank); ``-1`` leaves nothing out.
    """
    queries = F.normalize(query_features.detach().float(), dim=1)
    bank = F.normalize(bank_features.detach().float(), dim=1)
    available = bank.shape[0] - (0 if exclude is None else 1)
    if not 0 < k <= available:
        raise ValueError(f"k={k} neighbours asked of a bank of {bank.shape[0]} images; use 1 <= k <= {available}")
    sims = queries @ bank.T
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).flatten()
        sims[rows, exclude[rows]] = -math.inf
    return sims.topk(k, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------

def unnormalize(images: torch.Tensor, normalization: Normalization = "imagenet") -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` on ``(..., 3, H, W)`` images: pixels in [0, 1] for display."""
    mean, std = NORMALIZATION[normalization] if isinstance(normalization, str) else normalization
    mean = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


def upscale_factor(side: int, min_side: int) -> int:
    """The whole factor that brings ``side`` px to at least ``min_side`` px (1 for images already that big)."""
    return max(1, -(-min_side // side))


def _to_pil(image01: torch.Tensor, scale: int = 1) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> RGB image, enlarged ``scale`` times, nearest (pixels stay sharp squares)."""
    pixels = (image01.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    img = Image.fromarray(pixels.contiguous().numpy(), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def _colourise(heat: torch.Tensor, cmap: str) -> torch.Tensor:
    """``(h, w)`` scalars -> ``(3, h, w)`` colours, min-max scaled per map; ``(h, w, 3)`` is taken as colours."""
    heat = heat.detach().float().cpu()
    if heat.dim() == 3:
        return heat.permute(2, 0, 1).clamp(0, 1)
    low, high = heat.min(), heat.max()
    unit = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    import matplotlib

    rgba = matplotlib.colormaps[cmap](unit.numpy())
    return torch.from_numpy(rgba[..., :3]).float().permute(2, 0, 1)


def overlay(image01: torch.Tensor, heat: torch.Tensor, alpha: float = 0.6, cmap: str = "inferno",
            min_side: int = 128) -> Image.Image:
    """``image01`` ``(3, H, W)`` in [0, 1] with ``heat`` laid over it: ``(h, w)`` scalars through ``cmap`` (min-max
    per map) or ``(h, w, 3)`` colours in [0, 1], nearest-upsampled to ``H x W`` (each patch a solid square) and
    blended with weight ``alpha``. The result is enlarged by ``upscale_factor(min(H, W), min_side)``."""
    colours = _colourise(heat, cmap)
    colours = F.interpolate(colours[None], size=tuple(image01.shape[-2:]), mode="nearest")[0]
    blended = (1 - alpha) * image01.detach().float().cpu() + alpha * colours
    return _to_pil(blended, upscale_factor(min(image01.shape[-2:]), min_side))


def _masked(image01: torch.Tensor, mask: torch.Tensor, min_side: int) -> Image.Image:
    """The image where ``mask`` ``(h, w)`` is set, dimmed to a quarter elsewhere."""
    keep = F.interpolate(mask[None, None].float().cpu(), size=tuple(image01.shape[-2:]), mode="nearest")[0]
    shown = image01.detach().float().cpu() * (0.25 + 0.75 * keep)
    return _to_pil(shown, upscale_factor(min(image01.shape[-2:]), min_side))


def _strip(tiles: Sequence[Image.Image]) -> Image.Image:
    """Tiles of one size side by side, ``GAP`` px of white between them."""
    width, height = tiles[0].size
    strip = Image.new("RGB", (len(tiles) * width + (len(tiles) - 1) * GAP, height), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * (width + GAP), 0))
    return strip


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """``text`` cut (with ``..``) to fit ``width`` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _save(img: Image.Image, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    except OSError as e:
        raise RunDirError(f"cannot write {path} ({e.strerror or e}); choose another output folder.") from None
    return path


def _names(names: Sequence[str] | None, count: int) -> list[str]:
    names = [f"image{i:03d}" for i in range(count)] if names is None else list(names)
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} images")
    return names


def save_attention_pngs(vit: nn.Module, images: torch.Tensor, out_dir: str | Path, names: Sequence[str] | None = None,
                        normalization: Normalization = "imagenet", threshold: float | None = None,
                        min_side: int = 128) -> list[Path]:
    """DINO's figure for each of the ``(B, 3, H, W)`` normalised ``images``, in ``out_dir``:

    - ``{name}_image.png``: the image;
    - ``{name}_attn_head{j}.png``: the class token's attention of head ``j`` over the image (``cls_attention``);
    - ``{name}_attn.png``: the image and every head's map side by side;
    - with ``threshold`` t: ``{name}_mask_head{j}.png``, the image dimmed outside the smallest set of patches that
      holds fraction t of head j's attention (``threshold_masks``).

    Tiles are ``H * s x W * s`` px, ``s = upscale_factor(min(H, W), min_side)``; the strip is ``1 + heads`` tiles with
    ``GAP`` px between them. ``names`` default to ``image000``, ... Returns the written paths.
    """
    out_dir, names = Path(out_dir), _names(names, images.shape[0])
    maps = cls_attention(vit, images)
    masks = threshold_masks(maps, threshold) if threshold is not None else None
    shown = unnormalize(images, normalization)
    scale = upscale_factor(min(images.shape[-2:]), min_side)
    written = []
    for i, name in enumerate(names):
        image_tile = _to_pil(shown[i], scale)
        heads = [overlay(shown[i], head, min_side=min_side) for head in maps[i]]
        written.append(_save(image_tile, out_dir / f"{name}_image.png"))
        written += [_save(tile, out_dir / f"{name}_attn_head{j}.png") for j, tile in enumerate(heads)]
        written.append(_save(_strip([image_tile, *heads]), out_dir / f"{name}_attn.png"))
        if masks is not None:
            written += [_save(_masked(shown[i], mask, min_side), out_dir / f"{name}_mask_head{j}.png")
                        for j, mask in enumerate(masks[i])]
    return written


def save_pca_pngs(backbone: nn.Module, images: torch.Tensor, out_dir: str | Path, names: Sequence[str] | None = None,
                  normalization: Normalization = "imagenet", alpha: float = 0.6, min_side: int = 128) -> list[Path]:
    """``{name}_pca.png`` in ``out_dir`` for each normalised image: the image, the first three principal components
    of its patch features as RGB (``pca_rgb`` fitted on the whole batch, so colours agree across images) and the two
    blended, side by side: three tiles of ``H * s x W * s`` px with ``GAP`` px between them. Any ViT or Swin."""
    out_dir, names = Path(out_dir), _names(names, images.shape[0])
    rgb = pca_rgb(feature_grid(backbone, images))
    shown = unnormalize(images, normalization)
    scale = upscale_factor(min(images.shape[-2:]), min_side)
    written = []
    for i, name in enumerate(names):
        tiles = [_to_pil(shown[i], scale), overlay(shown[i], rgb[i], alpha=1.0, min_side=min_side),
                 overlay(shown[i], rgb[i], alpha=alpha, min_side=min_side)]
        written.append(_save(_strip(tiles), out_dir / f"{name}_pca.png"))
    return written


def _label_text(label: int | None, class_names: Sequence[str] | None) -> str:
    if label is None or label < 0:
        return "?"
    return class_names[label] if class_names is not None and label < len(class_names) else str(label)


def save_retrieval_grid(queries: torch.Tensor, neighbours: torch.Tensor, query_labels: torch.Tensor | None,
                        neighbour_labels: torch.Tensor | None, class_names: Sequence[str] | None, path: str | Path,
                        similarities: torch.Tensor | None = None, normalization: Normalization = "imagenet",
                        min_side: int = 96) -> Path:
    """One row per query: the query, then its ``k`` nearest neighbours in the bank, each captioned with its class.

    ``queries`` ``(Q, 3, H, W)`` and ``neighbours`` ``(Q, k, 3, H, W)`` normalised images; labels ``(Q,)`` and
    ``(Q, k)`` (negative or ``None``: unknown, shown as ``?``); ``class_names[label]`` names them (the number when
    ``None``); ``similarities`` ``(Q, k)`` are printed after the name. The query has a blue frame and the caption
    ``query: name``; a neighbour of the query's class a green frame and ``+ name``, of another class a red frame
    and ``- name``, of an unknown one a grey frame. Image: ``(1 + k) * S + k * GAP`` wide and
    ``Q * (S + CAPTION_HEIGHT) + (Q - 1) * GAP`` high, ``S = H * upscale_factor(min(H, W), min_side)``.
    """
    num_queries, k = neighbours.shape[:2]
    scale = upscale_factor(min(queries.shape[-2:]), min_side)
    tile_w, tile_h = queries.shape[-1] * scale, queries.shape[-2] * scale
    shown_queries, shown_neighbours = unnormalize(queries, normalization), unnormalize(neighbours, normalization)
    grid = Image.new("RGB", ((1 + k) * tile_w + k * GAP,
                             num_queries * (tile_h + CAPTION_HEIGHT) + (num_queries - 1) * GAP), "white")
    draw, font = ImageDraw.Draw(grid), _font(CAPTION_HEIGHT - 4)
    frame = max(2, tile_w // 48)

    def tile(image01, column, row, colour, caption):
        x, y = column * (tile_w + GAP), row * (tile_h + CAPTION_HEIGHT + GAP)
        grid.paste(_to_pil(image01, scale), (x, y))
        draw.rectangle([x, y, x + tile_w - 1, y + tile_h - 1], outline=colour, width=frame)
        draw.text((x + 1, y + tile_h + 1), _fit(caption, font, tile_w - 2), fill=colour, font=font)

    for q in range(num_queries):
        query_label = None if query_labels is None else int(query_labels[q])
        tile(shown_queries[q], 0, q, QUERY_COLOUR, f"query: {_label_text(query_label, class_names)}")
        for j in range(k):
            label = None if neighbour_labels is None else int(neighbour_labels[q, j])
            known = label is not None and label >= 0 and query_label is not None and query_label >= 0
            colour = UNKNOWN_COLOUR if not known else MATCH_COLOUR if label == query_label else MISMATCH_COLOUR
            mark = "" if not known else "+ " if label == query_label else "- "
            score = "" if similarities is None else f" {float(similarities[q, j]):.2f}"
            tile(shown_neighbours[q, j], 1 + j, q, colour, f"{mark}{_label_text(label, class_names)}{score}")
    return _save(grid, Path(path))


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------

def read_metrics(metrics: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train records, knn records)`` of a run's ``metrics.jsonl`` (or of the run folder holding it), by step.

    A resumed run logs again the steps after its checkpoint: the last record of a step wins. Values logged as
    strings (``"nan"``, ``"inf"``) become floats; an unreadable line (a run killed mid-write) is skipped.
    ``DataError`` naming the file when it is missing or has no train records.
    """
    path = Path(metrics)
    if not path.is_file() and path.suffix != ".jsonl":  # a run folder (or a missing one: name its metrics file)
        path = path / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read the training metrics {path} ({e.strerror or e}); give a run folder "
                        "(output_dir) that holds a metrics.jsonl.") from None
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "knn": {}}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("type") in by_kind and isinstance(record.get("step"), int):
            by_kind[record["type"]][record["step"]] = {key: _number(v) for key, v in record.items()}
    if not by_kind["train"]:
        raise DataError(f"{path} has no train records (lines with \"type\": \"train\"): nothing to plot. Has the run "
                        "logged a step yet (train.log_every)?")
    train, knn = ([records[step] for step in sorted(records)] for records in by_kind.values())
    return train, knn


def _number(value):
    if isinstance(value, str):
        try:
            return float(value)  # "nan" / "inf" as MetricsLogger writes non-finite values
        except ValueError:
            return value
    return value


def plot_training_curves(metrics: str | Path):
    """A matplotlib ``Figure`` (Agg canvas, no display) of a run's curves over steps: ``loss``, ``lr`` and, when
    the run has k-NN records, every ``knn_top1_k*``: one ``PANEL_INCHES`` panel each, in that order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, knn = read_metrics(metrics)
    knn_keys = sorted({key for record in knn for key in record if key.startswith("knn_top1_")},
                      key=lambda key: (len(key), key))  # k20 before k200
    panels = [("loss", ["loss"], train), ("learning rate", ["lr"], train)]
    if knn_keys:
        panels.append(("k-NN top-1 (%)", knn_keys, knn))
    fig = Figure(figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, keys, records) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(Path(metrics).resolve().name if Path(metrics).is_dir() else Path(metrics).resolve().parent.name)
    return fig


def save_training_curves(metrics: str | Path, path: str | Path) -> Path:
    """``plot_training_curves`` written as a PNG of ``400 * panels x 300`` px. ``metrics``: the run folder or its
    metrics.jsonl."""
    fig = plot_training_curves(metrics)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=DPI)
    except OSError as e:
        raise RunDirError(f"cannot write {path} ({e.strerror or e}); choose another output folder.") from None
    return path
