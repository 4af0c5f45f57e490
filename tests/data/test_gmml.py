"""SiT's GMML corruption, batched: the block law, the coverage rule, what each kind writes, the replacement pass,
aligned blocks, reproducibility and the config check, against the official per-image law (see mobyssl/data/gmml.py)."""

import math
from collections import Counter

import pytest
import torch

from mobyssl.data import gmml
from mobyssl.data.gmml import KINDS, GMMLCorruption, _draw_blocks, corrupt_views, coverable_fraction
from mobyssl.errors import ConfigError
from mobyssl.host_sync import HostSyncCounter, cuda_syncs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the corruption is a loop of small ops, for which handing work to a second thread costs
    far more than it saves when the cores are busy (30x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_block_law(size: int, align: int) -> dict[tuple[int, int], float]:
    """P(top, height) of one block, enumerated from the official numpy code (randint excludes its upper bound,
    Python's round is half-to-even)."""
    starts, sizes = range(0, size - align), range(align, int(0.3 * size))
    law = Counter()
    for start in starts:
        top = start // align * align
        for drawn in sizes:
            law[top, round(min(drawn, size - top) / align) * align] += 1 / (len(starts) * len(sizes))
    return dict(law)


def chi_square(observed: Counter, expected_probability: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; an outcome the law forbids makes the statistic infinite."""
    if set(observed) - set(expected_probability):
        return math.inf, len(expected_probability) - 1
    stat = sum((observed.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected_probability.items())
    return stat, len(expected_probability) - 1


def assert_fits(stat: float, dof: int):
    assert stat < dof + 6 * math.sqrt(2 * dof), f"chi-square {stat:.1f} with {dof} degrees of freedom"


def max_block_fraction(size: int, align: int) -> float:
    side = round((int(0.3 * size) - 1) / align) * align
    return side * side / (size * size)


def coverage(mask: torch.Tensor) -> torch.Tensor:
    return mask.double().mean(dim=(1, 2))


# --------------------------------------------------------------------------- the block law


@pytest.mark.parametrize("size, align", [(32, 1), (224, 16)])
def test_block_positions_and_sizes_follow_the_official_law(size, align):
    torch.manual_seed(0)
    n = 100_000
    top, left, h, w = _draw_blocks((n,), size, size, align, "cpu")
    for start, extent in ((top, h), (left, w)):
        assert (start % align == 0).all() and (extent % align == 0).all()
        assert start.min() == 0 and start.max() <= size - align - 1
        assert (extent >= align).all() and (start + extent <= size).all()
    law = exact_block_law(size, align)
    assert_fits(*chi_square(Counter(zip(top.tolist(), h.tolist())), law, n))
    assert_fits(*chi_square(Counter(zip(left.tolist(), w.tolist())), law, n))
    # Height and width are drawn independently: their joint law is the product of the marginals.
    marginal = Counter()
    for (_, extent), p in law.items():
        marginal[extent] += p
    joint = {(a, b): pa * pb for a, pa in marginal.items() for b, pb in marginal.items()}
    assert_fits(*chi_square(Counter(zip(h.tolist(), w.tolist())), joint, n))


@pytest.mark.parametrize("size, align", [(32, 8), (30, 8), (8, 1), (32, 1), (40, 6), (64, 16)])
def test_coverable_fraction_is_what_many_blocks_reach(size, align):
    torch.manual_seed(1)
    top, left, h, w = _draw_blocks((20_000,), size, size, align, "cpu")
    lines = torch.arange(size)
    rows = ((lines >= top[:, None]) & (lines < (top + h)[:, None])).any(0).sum().item()
    cols = ((lines >= left[:, None]) & (lines < (left + w)[:, None])).any(0).sum().item()
    assert coverable_fraction(size, align) == pytest.approx(rows * cols / size**2, abs=1e-12)


def test_coverable_fraction_of_known_cases():
    assert coverable_fraction(32, 8) == 9 / 16  # one-cell blocks started in cells 0..2 of 4
    assert coverable_fraction(224, 16) == 1.0  # two-cell blocks reach the last cell from cell 12
    assert coverable_fraction(224, 1) == 1.0
    assert coverable_fraction(8, 1) == (7 / 8) ** 2  # int(0.3 * 8) = 2: only 1-pixel blocks, started at 0..6


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("size", [32, 64])
def test_coverage_reaches_the_target_and_overshoots_by_at_most_one_block(size):
    torch.manual_seed(2)
    _, mask = GMMLCorruption(drop_perc=0.5, drop_replace=0.0)(torch.randn(300 if size == 32 else 100, 3, size, size))
    got = coverage(mask)
    assert (got >= 0.5).all()
    assert (got <= 0.5 + max_block_fraction(size, 1)).all()
    assert got.mean() < 0.5 + max_block_fraction(size, 1) / 2  # usually well short of a whole extra block


def test_target_above_one_half_is_uniform_from_one_half():
    torch.manual_seed(3)
    got = coverage(GMMLCorruption(drop_perc=0.7, drop_replace=0.0)(torch.randn(1000, 1, 32, 32))[1])
    assert (got >= 0.5).all() and (got <= 0.7 + max_block_fraction(32, 1)).all()
    assert 0.59 < got.mean() < 0.63  # the mean target is 0.6, plus a small overshoot
    assert 0.15 < (got < 0.55).double().mean() < 0.32  # targets spread over [0.5, 0.7] ...
    assert 0.15 < (got > 0.65).double().mean() < 0.40  # ... not piled at either end
    assert (got > 0.7).any() and (got < 0.52).any()


def test_zero_fraction_leaves_pass_one_images_clean():
    torch.manual_seed(4)
    images = torch.randn(200, 3, 16, 16)
    corrupted, mask = GMMLCorruption(drop_perc=0.0, drop_replace=0.2)(images)
    untouched = ~mask.flatten(1).any(1)
    assert 0.35 < untouched.double().mean() < 0.65
    assert torch.equal(corrupted[untouched], images[untouched])
    assert (coverage(mask[~untouched]) >= 0.2).all()


# --------------------------------------------------------------------------- what each kind writes


@pytest.mark.parametrize("kinds, drop_replace", [(("zeros",), 0.0), (("noise",), 0.0), (("copy",), 0.0),
                                                 (("zeros", "noise", "copy"), 0.3)])
def test_unmasked_pixels_are_untouched_bit_for_bit(kinds, drop_replace):
    torch.manual_seed(5)
    images = torch.randn(64, 3, 32, 32)
    before = images.clone()
    corrupted, mask = GMMLCorruption(drop_perc=0.5, drop_replace=drop_replace, drop_types=kinds)(images)
    assert torch.equal(images, before)  # the input is not modified
    assert corrupted.shape == images.shape and mask.shape == (64, 32, 32) and mask.dtype == torch.bool
    keep = ~mask[:, None].expand_as(images)
    assert torch.equal(corrupted[keep], images[keep])
    assert (corrupted[~keep] != images[~keep]).any()


def test_zeros_blocks_are_exactly_zero():
    torch.manual_seed(6)
    corrupted, mask = GMMLCorruption(drop_perc=0.5, drop_replace=0.0)(torch.randn(64, 3, 32, 32) + 5)
    assert (corrupted.permute(1, 0, 2, 3)[:, mask] == 0).all()


def test_noise_blocks_are_standard_normal_per_channel_and_pixel():
    torch.manual_seed(7)
    images = torch.full((64, 3, 32, 32), 100.0)
    corrupted, mask = GMMLCorruption(drop_perc=0.5, drop_replace=0.0, drop_types=("noise",))(images)
    values = corrupted.permute(1, 0, 2, 3)[:, mask]  # (C, masked pixels)
    assert (values.abs() < 10).all()  # every masked pixel was overwritten
    flat = values.flatten().double()
    assert values.numel() > 90_000
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    assert abs((flat.abs() > 2).double().mean() - 0.0455) < 0.005  # normal tails (uniform noise has none)
    assert abs(torch.corrcoef(values[:2].double())[0, 1]) < 0.02  # channels drawn independently


def encoded_images(batch: int, channels: int, size: int) -> torch.Tensor:
    """Images whose every value names its own (image, channel, row, column)."""
    return torch.arange(batch * channels * size * size, dtype=torch.float64).view(batch, channels, size, size)


def decode(values: torch.Tensor, channels: int, size: int) -> tuple[torch.Tensor, ...]:
    index = values.long()
    return index // (channels * size * size), index // (size * size) % channels, index // size % size, index % size


@pytest.mark.parametrize("align", [1, 4])
def test_copy_blocks_come_from_the_same_image(align):
    torch.manual_seed(8)
    batch, channels, size = 64, 2, 32
    corrupted, mask = GMMLCorruption(drop_perc=0.5, drop_replace=0.0, drop_align=align,
                                     drop_types=("copy",))(encoded_images(batch, channels, size))
    image, channel, row, col = decode(corrupted, channels, size)
    owner = torch.arange(batch)[:, None, None, None].expand_as(image)
    assert torch.equal(image, owner)  # copies never cross images
    assert torch.equal(channel, torch.arange(channels)[None, :, None, None].expand_as(channel))
    assert (row == row[:, :1]).all() and (col == col[:, :1]).all()  # all channels copied from one place
    masked = mask[:, None].expand_as(row)
    here_row = torch.arange(size)[None, None, :, None].expand_as(row)
    here_col = torch.arange(size)[None, None, None, :].expand_as(col)
    moved = (row != here_row) | (col != here_col)
    assert moved[masked].double().mean() > 0.9  # a copy comes from elsewhere, not from the block itself
    assert ((row - here_row) % align == 0).all() and ((col - here_col) % align == 0).all()
    # The source corner is drawn from [0, side - size): the last row and column are never a source.
    assert (row[masked] < size - 1).all() and (col[masked] < size - 1).all()
    assert (row[masked] == size - 2).any() or align > 1


def sequential_reference(images, choices, blocks, corners, align):
    """The official per-image loop (one block at a time, stop once the coverage reaches the target), fed the blocks,
    source corners and per-image choices that the batched code drew. Noise blocks only mark the mask here."""
    replaced, source, kind, target = choices
    batch, _, size, _ = images.shape
    out, masks = images.clone(), torch.zeros(batch, size, size, dtype=torch.bool)
    for i in range(batch):
        x, mask = out[i], masks[i]
        for k in range(blocks[0].shape[1]):
            if mask.sum() >= target[i]:
                break
            r, c, h, w = (int(b[i, k]) for b in blocks)
            rows, cols = slice(r, min(r + h, size)), slice(c, min(c + w, size))
            if replaced[i]:
                x[:, rows, cols] = images[source[i], :, rows, cols]
            elif KINDS[kind[i]] == "zeros":
                x[:, rows, cols] = 0
            elif KINDS[kind[i]] == "copy":
                r2, c2 = (int(corner[i, k]) // align * align for corner in corners)
                hh, ww = rows.stop - r, cols.stop - c
                x[:, rows, cols] = x[:, r2:r2 + hh, c2:c2 + ww].clone()
            mask[rows, cols] = True
    return out, masks


@pytest.mark.parametrize("align, chunk_elements, fractions", [
    (1, 3 * 12 * 32 * 32, (0.7, 0.3)),
    (4, 3 * 12 * 32 * 32, (0.5, 0.25)),  # whole targets (512 and 256 px) that 4 x 4 cells can hit exactly
    (1, 2**26, (0.7, 0.3)),
], ids=["pixels-3-blocks-a-round", "aligned-3-blocks-a-round", "pixels-default-rounds"])
def test_batched_rounds_equal_the_official_loop_block_by_block(monkeypatch, align, chunk_elements, fractions):
    """Given the same draws, the batched corruption equals the official loop image by image: the same blocks are
    used (the stopping rule across rounds of blocks), copies read earlier blocks' output, replacements take the
    source's clean pixels; unmasked pixels are untouched."""
    drawn = {"blocks": [], "corners": [], "choices": None}

    def spy(record, function):
        def recorded(*args, **kwargs):
            out = function(*args, **kwargs)
            record(out)
            return out
        return recorded

    monkeypatch.setattr(gmml, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(gmml, "_draw_blocks", spy(drawn["blocks"].append, gmml._draw_blocks))
    monkeypatch.setattr(gmml, "_randint_below", spy(drawn["corners"].append, gmml._randint_below))
    corruption = GMMLCorruption(*fractions, drop_align=align, drop_types=("zeros", "noise", "copy"))
    monkeypatch.setattr(GMMLCorruption, "_draw_images",
                        spy(lambda out: drawn.update(choices=out), GMMLCorruption._draw_images))
    torch.manual_seed(21)
    images = torch.randn(12, 3, 32, 32)
    corrupted, mask = corruption(images)
    if chunk_elements < 2**26:
        assert len(drawn["blocks"]) > 3  # several rounds of 3 blocks were stitched together
    blocks = [torch.cat([b[j] for b in drawn["blocks"]], dim=1) for j in range(4)]
    corners = [torch.cat(drawn["corners"][j::2], dim=1) for j in range(2)]
    expected, expected_mask = sequential_reference(images, drawn["choices"], blocks, corners, align)
    assert torch.equal(mask, expected_mask)
    noise = (~drawn["choices"][0] & (drawn["choices"][2] == KINDS.index("noise")))[:, None, None, None]
    assert torch.equal(torch.where(noise & mask[:, None], 0.0, corrupted),
                       torch.where(noise & mask[:, None], 0.0, expected))
    kinds_seen = {KINDS[k] for k, r in zip(drawn["choices"][2].tolist(), drawn["choices"][0].tolist()) if not r}
    assert kinds_seen == set(KINDS) and drawn["choices"][0].any()  # every path was exercised


def test_a_copy_reads_the_image_as_corrupted_by_earlier_blocks(monkeypatch):
    # Block 1 copies (4..5, 4..5) onto (0..1, 0..1); block 2 copies (0..1, 0..1), now corrupted, onto (8..9, 8..9).
    # The round repeats the two blocks; the later ones are not used: the target is reached after block 2.
    def scripted_blocks(shape, height, width, align, device):
        return tuple(torch.tensor([first, second]).expand(shape[0], 2).repeat(1, shape[1])[:, :shape[1]]
                     for first, second in ((0, 8), (0, 8), (2, 2), (2, 2)))

    corners = iter([(4, 0), (4, 0)])  # source rows, then columns, of blocks 1 and 2

    def scripted_corners(upper):
        return torch.tensor(next(corners)).expand(upper.shape[0], 2).repeat(1, upper.shape[1])[:, :upper.shape[1]]

    monkeypatch.setattr(gmml, "_draw_blocks", scripted_blocks)
    monkeypatch.setattr(gmml, "_randint_below", scripted_corners)
    images = torch.arange(256.0).view(1, 1, 16, 16)
    corrupted, mask = GMMLCorruption(drop_perc=0.02, drop_replace=0.0, drop_types=("copy",))(images)  # 5.12 px
    original = images[0, 0, 4:6, 4:6]
    assert torch.equal(corrupted[0, 0, 0:2, 0:2], original)
    assert torch.equal(corrupted[0, 0, 8:10, 8:10], original)
    assert mask.sum() == 8 and mask[0, 0:2, 0:2].all() and mask[0, 8:10, 8:10].all()


def test_replacement_takes_a_uniform_clean_image_of_the_batch_half_the_time():
    torch.manual_seed(9)
    batch, calls = 8, 300
    corruption = GMMLCorruption(drop_perc=0.1, drop_replace=0.05)  # pass 1 writes zeros
    images = (torch.arange(batch, dtype=torch.float32) + 1)[:, None, None, None].expand(batch, 3, 16, 16)
    offsets, replaced = Counter(), 0
    for _ in range(calls):
        corrupted, mask = corruption(images)
        for i in range(batch):
            values = corrupted[i].permute(1, 2, 0)[mask[i]]
            assert values.numel() > 0
            if (values == 0).all():
                continue  # pass 1
            assert (values == values[0, 0]).all()  # one source, clean (never a corrupted zero), for the whole image
            source = int(values[0, 0]) - 1
            assert 0 <= source < batch
            offsets[(source - i) % batch] += 1
            replaced += 1
    n = batch * calls
    assert abs(replaced - n / 2) < 4 * math.sqrt(n / 4)  # a fair coin picks pass 2
    # The source is uniform over the batch, the image itself (offset 0) included.
    assert_fits(*chi_square(offsets, {k: 1 / batch for k in range(batch)}, replaced))
    assert offsets[0] > replaced / batch - 4 * math.sqrt(replaced / batch)


def test_replacement_masks_reach_their_own_target():
    torch.manual_seed(10)
    images = torch.arange(1.0, 201.0)[:, None, None, None].expand(200, 1, 32, 32)
    corrupted, mask = GMMLCorruption(drop_perc=0.5, drop_replace=0.3, drop_types=("zeros",))(images)
    replaced = corrupted.flatten(1).gt(0).all(1) & mask.flatten(1).any(1)
    got = coverage(mask)
    assert 60 < replaced.sum() < 140
    assert (got[replaced] >= 0.3).all() and (got[replaced] <= 0.3 + max_block_fraction(32, 1)).all()
    assert (got[~replaced] >= 0.5).all()


def test_each_image_uses_one_kind_and_kinds_are_equally_likely():
    torch.manual_seed(11)
    n = 600
    corrupted, mask = GMMLCorruption(drop_perc=0.3, drop_replace=0.0, drop_types=("zeros", "noise"))(
        torch.full((n, 3, 16, 16), 100.0))
    zeros = 0
    for i in range(n):
        values = corrupted[i].permute(1, 2, 0)[mask[i]]
        assert (values != 100).all()
        if (values == 0).all():
            zeros += 1
        else:
            assert not (values == 0).all(1).any()  # no zero-block pixel (all channels 0) among the noise
    assert abs(zeros - n / 2) < 4 * math.sqrt(n / 4)


# --------------------------------------------------------------------------- aligned blocks


def test_aligned_masks_are_unions_of_whole_cells():
    torch.manual_seed(12)
    align = 4
    _, mask = GMMLCorruption(drop_perc=0.6, drop_replace=0.3, drop_align=align,
                             drop_types=("zeros", "noise", "copy"))(torch.randn(100, 3, 32, 32))
    cells = mask.view(100, 8, align, 8, align).permute(0, 1, 3, 2, 4).flatten(3)
    assert (cells.all(-1) == cells.any(-1)).all()


def test_with_align_8_at_32_px_the_last_cell_row_and_column_are_never_masked():
    torch.manual_seed(13)
    images = torch.randn(200, 3, 32, 32)
    corrupted, mask = GMMLCorruption(drop_perc=0.5625, drop_replace=0.3, drop_align=8)(images)
    assert not mask[:, 24:].any() and not mask[:, :, 24:].any()
    assert mask[:, :24, :24].view(200, 3, 8, 3, 8).all(2).all(3).flatten(1).any(0).all()  # the 9 others are used
    assert torch.equal(corrupted[:, :, 24:], images[:, :, 24:])


# --------------------------------------------------------------------------- reproducibility, dtypes, devices


def test_the_seed_reproduces_the_output_and_resumes_exactly():
    images = torch.randn(16, 3, 32, 32)
    corruption = GMMLCorruption(drop_perc=0.7, drop_replace=0.3, drop_types=("zeros", "noise", "copy"))
    torch.manual_seed(14)
    first = corruption(images)
    state = torch.get_rng_state()
    second = corruption(images)
    torch.manual_seed(14)
    again = corruption(images)
    torch.set_rng_state(state)
    resumed = corruption(images)
    for a, b in ((first, again), (second, resumed)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_any_float_dtype_gives_the_same_masks(dtype):
    images = torch.randn(16, 3, 32, 32)
    corruption = GMMLCorruption(drop_perc=0.5, drop_replace=0.3)
    torch.manual_seed(15)
    reference, reference_mask = corruption(images)
    torch.manual_seed(15)
    corrupted, mask = corruption(images.to(dtype))
    assert corrupted.dtype == dtype and torch.equal(mask, reference_mask)
    assert torch.equal(corrupted, reference.to(dtype))


def test_views_are_corrupted_separately():
    torch.manual_seed(16)
    views = [torch.arange(1.0, 17.0)[:, None, None, None].expand(16, 3, 32, 32),
             torch.arange(101.0, 117.0)[:, None, None, None].expand(16, 3, 16, 16)]
    corrupted, masks = corrupt_views(GMMLCorruption(drop_perc=0.3, drop_replace=0.3), views)
    assert [c.shape for c in corrupted] == [v.shape for v in views]
    assert [m.shape for m in masks] == [(16, 32, 32), (16, 16, 16)]
    for out, low in zip(corrupted, (1, 101)):
        replaced = (out >= low) & (out < low + 16)
        assert (replaced | (out == 0)).all()  # zeros, or a value of the same view: sources come from that view


@pytest.mark.gpu
def test_runs_on_cuda():
    images = torch.randn(64, 3, 64, 64, device="cuda")
    torch.manual_seed(17)
    corrupted, mask = GMMLCorruption(drop_perc=0.7, drop_replace=0.3, drop_align=4,
                                     drop_types=("zeros", "noise", "copy"))(images)
    assert corrupted.device == images.device and mask.device == images.device
    keep = ~mask[:, None].expand_as(images)
    assert torch.equal(corrupted[keep], images[keep])
    got = coverage(mask)
    assert (got >= 0.3).all() and (got <= 0.7 + max_block_fraction(64, 4)).all()
    torch.manual_seed(17)
    again = GMMLCorruption(drop_perc=0.7, drop_replace=0.3, drop_align=4, drop_types=("zeros", "noise", "copy"))(images)
    assert torch.equal(again[0], corrupted) and torch.equal(again[1], mask)


@pytest.mark.gpu
def test_on_cuda_the_host_waits_once_per_round_of_blocks(monkeypatch):
    """CUDA's own sync detector agrees with the CPU-side count: one wait per round of blocks, nothing else (no
    pageable copies of Python lists to the device either)."""
    rounds = []
    original = GMMLCorruption._add_blocks
    monkeypatch.setattr(GMMLCorruption, "_add_blocks", lambda self, *a: rounds.append(1) or original(self, *a))
    corruption = GMMLCorruption(drop_perc=0.7, drop_replace=0.3, drop_types=("zeros", "noise", "copy"))
    images = torch.randn(64, 3, 224, 224, device="cuda")
    corruption(images)  # the device constants are made once, outside the count
    rounds.clear()
    torch.cuda.synchronize()
    _, waits = cuda_syncs(corruption, images)
    assert len(rounds) >= 1 and waits == len(rounds)


def test_the_host_reads_from_the_device_once_per_round_of_blocks(monkeypatch):
    """Everything else stays on the device: no ``.item()``, no boolean-mask indexing, no ``nonzero``."""
    rounds = []
    original = GMMLCorruption._add_blocks
    monkeypatch.setattr(GMMLCorruption, "_add_blocks", lambda self, *a: rounds.append(1) or original(self, *a))
    monkeypatch.setattr(gmml, "CHUNK_ELEMENTS", 4 * 16 * 32 * 32)  # rounds of 4 blocks: several rounds
    torch.manual_seed(22)
    images = torch.randn(16, 3, 32, 32)
    with HostSyncCounter() as syncs:
        GMMLCorruption(drop_perc=0.7, drop_replace=0.3, drop_types=KINDS)(images)
    assert len(rounds) > 1 and syncs.counts == {"_local_scalar_dense": len(rounds)}


# --------------------------------------------------------------------------- the config check and bad input


@pytest.mark.parametrize("changes, size, key, fix", [
    (dict(drop_perc=1.0), 224, "method.drop_perc", "[0, 1)"),
    (dict(drop_perc=-0.1), 224, "method.drop_perc", "[0, 1)"),
    (dict(drop_replace=1.5), 224, "method.drop_replace", "[0, 1)"),
    (dict(drop_perc=0.0, drop_replace=0.0), 224, "method.drop_perc", "drop_perc=0.5"),
    (dict(drop_types=("blur",)), 224, "method.drop_type", "zeros, noise, copy"),
    (dict(drop_types=()), 224, "method.drop_type", "zeros, noise, copy"),
    (dict(drop_align=0), 224, "method.drop_align", ">= 1"),
    (dict(drop_align=9), 32, "method.drop_align", "drop_align <= 8 or images of at least 34 px"),
    (dict(drop_align=32), 32, "method.drop_align", "at most 8"),
    (dict(drop_align=8, drop_perc=0.6), 32, "method.drop_perc", "at most 0.5625"),
    (dict(drop_align=8, drop_perc=0.5, drop_replace=0.7), 32, "method.drop_replace", "at most 0.5625"),
    (dict(drop_perc=0.8), 8, "method.drop_perc", "at most 0.7656"),
])
def test_check_names_the_key_and_the_fix(changes, size, key, fix):
    with pytest.raises(ConfigError) as raised:
        GMMLCorruption(**changes).check(size)
    assert key in str(raised.value) and fix in str(raised.value)


def test_check_accepts_good_settings_and_uses_the_key_prefix():
    GMMLCorruption().check(224)
    GMMLCorruption().check(32)
    GMMLCorruption(drop_perc=0.7, drop_replace=0.3, drop_align=16, drop_types=gmml.KINDS).check(224)
    GMMLCorruption(drop_perc=0.5, drop_replace=0.3, drop_align=8).check(32)
    GMMLCorruption(drop_perc=0.5625, drop_replace=0.3, drop_align=8).check(32)  # exactly the coverable fraction
    with pytest.raises(ConfigError, match=r"sit\.drop_perc"):
        GMMLCorruption(drop_perc=2.0).check(224, key_prefix="sit.")


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="drop_align"):
        GMMLCorruption(drop_align=8, drop_perc=0.6)(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="square"):
        GMMLCorruption()(torch.zeros(2, 3, 32, 48))
    with pytest.raises(ValueError, match="float"):
        GMMLCorruption()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_the_round_cap_raises_instead_of_looping(monkeypatch):
    monkeypatch.setattr(gmml, "MAX_ROUNDS", 1)
    with pytest.raises(RuntimeError, match="did not reach its target"):
        GMMLCorruption(drop_perc=0.5, drop_replace=0.0)(torch.zeros(2, 1, 32, 32))
