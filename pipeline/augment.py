"""Training-time augmentation of image batches, on whatever device the batch is on.

The authors' CIFAR loaders apply, per image: random crop after zero padding (CIFAR-100),
horizontal flip with probability 1/2, and rotation by an angle uniform in [-d, d] degrees
(CIFAR-10), before normalising. Here images are already normalised tensors, so "zero"
(black) is the dataset's ``pad_value`` per channel, and every random draw comes from the
caller's CPU generator: the same seed gives the same augmentations on CPU and GPU, and a
checkpoint that saves the generator resumes them exactly. The draws (a few numbers per
image) go to the batch's device in copies that do not wait for it; the pixels never leave
it. The result keeps the batch's memory format (channels-last stays channels-last).

Only training batches are augmented. Validation and test images never are (the authors'
validation loader reused the training transforms; we do not copy that quirk).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Random crop (``crop_padding`` pixels of padding), then horizontal flip, then rotation
    (``rotate_degrees``), each independently per image; ``pad_value`` fills what the crop
    and the rotation bring in."""

    hflip: bool = False
    rotate_degrees: float = 0.0
    crop_padding: int = 0
    pad_value: tuple[float, ...] = (0.0,)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any], pad_value: Sequence[float]) -> Augmentation:
        """From ``classifier.augmentation`` in params.yaml and the dataset's pad value."""
        return cls(hflip=bool(cfg["hflip"]), rotate_degrees=float(cfg["rotate_degrees"]),
                   crop_padding=int(cfg["crop_padding"]), pad_value=tuple(pad_value))

    @property
    def active(self) -> bool:
        return self.hflip or self.rotate_degrees > 0 or self.crop_padding > 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented copy of ``images`` (B, C, H, W); ``images`` itself when inactive."""
        if not self.active:
            return images
        channels_last = (images.is_contiguous(memory_format=torch.channels_last)
                         and not images.is_contiguous())
        fill = torch.tensor(self.pad_value, dtype=images.dtype, device=images.device)
        fill = fill.view(1, -1, 1, 1).expand(1, images.shape[1], 1, 1)
        if self.crop_padding > 0:
            images = random_crop(images, self.crop_padding, fill, generator)
        if self.hflip:
            flip = _to(torch.rand(len(images), generator=generator) < 0.5, images.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.rotate_degrees > 0:
            images = random_rotation(images, self.rotate_degrees, fill, generator)
        if channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images


def _to(draws: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random draws made on the CPU, on ``device``: a copy that does not wait for the
    device (the CPU buffer is staged at once, so it is safe to reuse)."""
    return draws.to(device, non_blocking=True)


def random_crop(images: torch.Tensor, padding: int, fill: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """Pad every side by ``padding`` with ``fill``, then crop back to the original size at
    an offset drawn uniformly per image (torchvision's ``RandomCrop(size, padding)``)."""
    batch, channels, height, width = images.shape
    canvas = fill.expand(batch, channels, height + 2 * padding, width + 2 * padding).clone()
    canvas[:, :, padding:padding + height, padding:padding + width] = images
    top = _to(torch.randint(0, 2 * padding + 1, (batch,), generator=generator), images.device)
    left = _to(torch.randint(0, 2 * padding + 1, (batch,), generator=generator), images.device)
    rows = (top[:, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (left[:, None] + torch.arange(width, device=images.device))[:, None, :]
    picked = canvas[torch.arange(batch, device=images.device)[:, None, None], :, rows, cols]
    return picked.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)


def random_rotation(images: torch.Tensor, degrees: float, fill: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Rotate each image about its centre by an angle uniform in [-degrees, degrees],
    nearest-neighbour (torchvision's ``RandomRotation`` default), ``fill`` outside."""
    angles = (torch.rand(len(images), generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    theta = _to(theta, images.device).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample fills with zeros: rotate the offset from `fill` so the outside is `fill`.
    rotated = F.grid_sample(images - fill, grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)
    return rotated + fill


def flip_pairs(images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation's augmentation (authors' CamVid: horizontal flip): each image (B, C, H,
    W) and its label map (B, H, W) flipped together with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
    return images, labels
