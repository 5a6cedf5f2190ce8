"""``pipeline.augment``: per-image random crop, flip and rotation of normalised batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import Augmentation, random_crop, random_rotation

FILL = (-1.5, 0.25, 2.0)  # a per-channel 'black' that no input pixel equals


def images(n: int = 64, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fill_tensor() -> torch.Tensor:
    return torch.tensor(FILL).view(1, 3, 1, 1)


def test_inactive_augmentation_returns_the_batch_itself() -> None:
    x = images()
    augment = Augmentation(pad_value=FILL)
    assert not augment.active
    assert augment(x, torch.Generator().manual_seed(0)) is x


def test_from_params_reads_the_augmentation_section() -> None:
    augment = Augmentation.from_params(
        {"hflip": True, "rotate_degrees": 15, "crop_padding": 4}, pad_value=[0.1, 0.2, 0.3])
    assert augment == Augmentation(True, 15.0, 4, (0.1, 0.2, 0.3))
    assert augment.active


def test_flip_mirrors_about_half_of_the_images_independently() -> None:
    x = images(200)
    out = Augmentation(hflip=True, pad_value=FILL)(x, torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # every image is itself or its mirror
    assert 60 < int(mirrored.sum()) < 140  # per image, not one coin for the batch


def test_crop_is_a_window_of_the_padded_image_filled_with_pad_value() -> None:
    x, padding = images(40), 2
    out = random_crop(x, padding, fill_tensor(), torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    padded = torch.cat([F.pad(x[:, c:c + 1], [padding] * 4, value=FILL[c]) for c in range(3)], 1)
    offsets = set()
    for i in range(len(x)):
        hits = [(top, left) for top in range(2 * padding + 1) for left in range(2 * padding + 1)
                if torch.equal(out[i], padded[i, :, top:top + 8, left:left + 8])]
        assert hits, f"image {i} is not a window of its padded copy"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets drawn per image


def test_rotation_keeps_values_and_fills_corners() -> None:
    x = images(32, size=16)
    out = random_rotation(x, 45.0, fill_tensor(), torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    for i in range(len(x)):
        for c in range(3):
            values = out[i, c][~torch.isclose(out[i, c], torch.tensor(FILL[c]))]
            # nearest-neighbour sampling never invents a value (up to the fill round trip)
            distance = (values[:, None] - x[i, c].flatten()[None, :]).abs().min(1).values
            assert float(distance.max()) < 1e-5
    corner_is_fill = torch.isclose(out[:, 0, 0, 0], torch.tensor(FILL[0]))
    assert int(corner_is_fill.sum()) > 10  # most angles in [-45, 45] rotate a corner out


def test_tiny_rotation_is_the_identity() -> None:
    x = images(8, size=12)
    out = random_rotation(x, 1e-6, fill_tensor(), torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x)


def test_same_generator_state_gives_the_same_augmentation() -> None:
    augment = Augmentation(hflip=True, rotate_degrees=15.0, crop_padding=4, pad_value=FILL)
    x = images(16, size=32)
    first = augment(x, torch.Generator().manual_seed(5))
    again = augment(x, torch.Generator().manual_seed(5))
    other = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(x, images(16, size=32))  # the input is not modified in place


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_augmentation() -> None:
    augment = Augmentation(hflip=True, rotate_degrees=15.0, crop_padding=4, pad_value=FILL)
    x = images(16, size=32)
    on_cpu = augment(x, torch.Generator().manual_seed(7))
    on_gpu = augment(x.cuda(), torch.Generator().manual_seed(7)).cpu()
    torch.testing.assert_close(on_gpu, on_cpu)
