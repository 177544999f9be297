"""Base classifiers and surrogates: small CNNs with the input normalization inside the model.

Every model takes float32 NCHW pixels in [0, 1] at the model's resolution and returns logits. The
mean/std normalization is the model's first layer, so σ, radii and the exported ONNX all live in
[0, 1]-pixel units (docs/CERTIFICATE.md). Only Conv2d, ReLU, MaxPool2d, AvgPool2d, Flatten and
Linear are used, which export to plain ONNX operators.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["ARCHS", "FORMAT", "Normalize", "build_model", "per_channel"]

# The model file format (written and read by :mod:`rrise.calibrate.model_files`).
FORMAT = "rrise.model/1"

# arch -> (conv widths of the two stages, hidden units of the classifier head)
ARCHS: dict[str, tuple[tuple[int, int], int]] = {
    "cnn": ((32, 64), 256),
    "cnn-small": ((16, 32), 128),
}

_MAX_HEAD_SIDE = 8


class Normalize(nn.Module):
    """Per-channel ``(x − mean) / std`` with mean and std kept as buffers (saved and exported)."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float], channels: int):
        super().__init__()
        mean_t = per_channel(mean, channels, "mean")
        std_t = per_channel(std, channels, "std")
        if torch.any(std_t <= 0):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, channels, 1, 1))
        self.register_buffer("std", std_t.view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def per_channel(value: float | Sequence[float], channels: int, name: str) -> torch.Tensor:
    """``value`` (one float or one per channel) as a float32 tensor of ``channels`` values."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if arr.ndim != 1 or arr.size not in (1, channels):
        raise ValueError(f"{name} must be a float or {channels} floats, got {value!r}")
    return torch.from_numpy(np.broadcast_to(arr, (channels,)).copy())


def _head_side(side: int) -> int:
    """Spatial side fed to the classifier head: the largest divisor of ``side`` that is ≤ 8.

    A divisor keeps the pooling an exact, ONNX-exportable AvgPool (adaptive pooling to a size that
    does not divide the input has no plain ONNX form) and bounds the head's width for big inputs.
    """
    return max(d for d in range(1, min(side, _MAX_HEAD_SIDE) + 1) if side % d == 0)


def build_model(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    seed: int | None = None,
) -> nn.Module:
    """A CNN for ``[B, in_channels, image_size, image_size]`` inputs in [0, 1] → ``[B, num_classes]`` logits.

    ``cnn`` (the default base model): conv32-relu-conv32-relu-maxpool-conv64-relu-conv64-relu-maxpool-
    fc256-relu-fc(K). ``cnn-small`` (an edge-sized surrogate) halves every width, about 4× fewer
    FLOPs. Convolutions are padded, so 8×8 (digits), 28×28 (MNIST) and 32×32 (CIFAR) all work.
    With ``seed``, the initial weights depend only on it (torch's global RNG is left as it was).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return build_model(arch, in_channels, num_classes, image_size, mean, std)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if in_channels < 1 or num_classes < 2:
        raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4 (two 2×2 poolings), got {image_size}")
    (c1, c2), hidden = ARCHS[arch]
    side = image_size // 4
    head = _head_side(side)
    pool: nn.Module = nn.Identity() if head == side else nn.AvgPool2d(side // head)
    return nn.Sequential(
        Normalize(mean, std, in_channels),
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c2, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        pool,
        nn.Flatten(),
        nn.Linear(c2 * head * head, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
