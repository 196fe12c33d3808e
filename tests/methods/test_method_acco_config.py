"""ACCO's configuration errors (single-process: validated before any communication)."""
import pytest
from torch import nn

from commrt.optim.acco import ACCO


def test_acco_bad_configuration_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown ACCO mode"):
        ACCO(model, mode="zero3")
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        ACCO(model, micro_batches=0)
    with pytest.raises(ValueError, match="min_micro_batches"):
        ACCO(model, min_micro_batches=5, max_micro_batches=2)
