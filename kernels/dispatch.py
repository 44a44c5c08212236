"""Choose the Triton kernel for CUDA tensors (or everywhere under TRITON_INTERPRET=1) and
the torch reference otherwise."""

from __future__ import annotations

import os

import torch


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton path should run for ``tensor``'s device."""
    if tensor.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
