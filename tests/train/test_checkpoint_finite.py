"""check_finite: weights with NaN or Inf in any floating tensor are refused, naming the source, the count and a key;
finite floats, integer tensors and non-tensor entries pass."""

import pytest
import torch

from mobyssl.errors import CheckpointError
from mobyssl.train.checkpoint import check_finite


def _finite():
    return {"a": torch.ones(3), "h": torch.zeros(2, dtype=torch.float16), "n": torch.tensor(7),
            "idx": torch.arange(4), "step": 12, "name": "vit"}


def test_finite_weights_integer_tensors_and_plain_values_pass():
    """Finite float tensors, integer tensors (num_batches_tracked) and non-tensor values are accepted."""
    check_finite(_finite(), "ckpt.pth")
    check_finite({}, "ckpt.pth")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_count_and_first_key(bad):
    """One NaN/Inf in a float tensor refuses the weights; the message names the source, the count and the first key."""
    sd = {**_finite(), "x": torch.tensor([1.0, bad]), "y": torch.full((2,), bad, dtype=torch.bfloat16)}
    with pytest.raises(CheckpointError) as e:
        check_finite(sd, "run/checkpoint_diagnostic.pth")
    msg = str(e.value)
    assert msg.startswith("run/checkpoint_diagnostic.pth holds non-finite weights (2 tensor(s) with NaN or Inf, e.g. x)")
