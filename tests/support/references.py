"""Independent references shared by several test files (plain numpy, float64)."""
import numpy as np
import torch


def stable_topk_indices(x: torch.Tensor, k: int) -> np.ndarray:
    """Exact top-k by |x| with ties to the lower index, ascending (float64, numpy)."""
    a = x.double().abs().numpy()
    return np.sort(np.argsort(-a, kind="stable")[:k])
