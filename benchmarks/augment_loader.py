"""Classifier training samples/s on CIFAR-shaped data with its augmentation: the pipeline's
batched tensor augmentation against a torchvision ``DataLoader`` with the equivalent
``torchvision.transforms.v2``.

Ours is what ``pipeline.training.train_classifier`` does per batch: index the in-memory
normalised float images and augment the batch at once (``pipeline.augment.Augmentation``,
one vectorised call; the draws from the loop's generator), inside the real
``train_one_epoch``. The reference keeps the images as uint8 HWC arrays, as the torchvision
datasets do, and transforms each image in the loader (``RandomCrop(32, padding=4)`` /
``RandomHorizontalFlip`` / ``RandomRotation(15)``, nearest, black fill, then ``ToDtype``
and ``Normalize``), collated into batches of the same size.

Two figures per augmentation (the presets' two: CIFAR-10 flips + rotations, CIFAR-100
flips + crops): the data path alone (batches produced and dropped) and the training step
with the presets' model (VGG16, SGD with momentum and weight decay) on
``--model-batches`` batches. Workers: on 2 cores the training step already uses both
(torch's threads), so the loader gets 1 worker (one core for the per-image transforms,
overlapped with the step); 0 workers (transforms in the training process) is shown too
for the data path.

    python benchmarks/augment_loader.py --out benchmarks/results/augment_loader.md
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import _bench
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline.augment import Augmentation
from pipeline.config import read_yaml
from pipeline.models import build_classifier
from pipeline.settings import compose
from pipeline.training import batches, train_one_epoch

MEAN, STD = 0.47, 0.25  # one scalar normalisation, as the prepared datasets have
BATCH = 128


class Images(Dataset[tuple[torch.Tensor, int]]):
    """uint8 (N, H, W, C) images and labels, each transformed when read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.transform(tv_tensors.Image(self.images[i].permute(2, 0, 1))),
                int(self.labels[i]))


def torchvision_transform(cfg: dict[str, Any]) -> v2.Compose:
    """The v2 equivalent of ``Augmentation.from_params(cfg)``, same order, then the
    normalisation the pipeline applies once at load time."""
    steps: list[Any] = []
    if cfg["crop_padding"]:
        steps.append(v2.RandomCrop(32, padding=cfg["crop_padding"], fill=0))
    if cfg["hflip"]:
        steps.append(v2.RandomHorizontalFlip())
    if cfg["rotate_degrees"]:
        steps.append(v2.RandomRotation(cfg["rotate_degrees"], fill=0))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([MEAN] * 3, [STD] * 3)])


def measure(setting: str, x: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor,
            batch: int, n_model: int, workers: int, repeats: int,
            quick: bool) -> list[list[str]]:
    """The rows of one preset's augmentation: data path, then training steps."""
    n_images = len(x)
    gen = torch.Generator().manual_seed(0)
    rows: list[list[str]] = []
    params = read_yaml(compose([f"setting={setting}"]))
    cls_cfg, aug_cfg = params["classifier"], params["classifier"]["augmentation"]
    augment = Augmentation.from_params(aug_cfg, ((0 - MEAN) / STD,) * 3)
    name = ", ".join(k for k in ("hflip", "rotate_degrees", "crop_padding") if aug_cfg[k])
    transform = torchvision_transform(aug_cfg)
    loaders = {w: DataLoader(Images(raw, labels, transform), batch_size=batch, shuffle=True,
                             num_workers=w, persistent_workers=w > 0,
                             generator=torch.Generator().manual_seed(0))
               for w in sorted({0, workers})}

    def ours_data() -> None:
        for idx in batches(n_images, batch, gen):
            augment(x[idx], gen)

    def loader_data(w: int) -> None:
        for _ in loaders[w]:
            pass

    runs: dict[str, Callable[[], Any]] = {"ours": ours_data}
    runs.update({f"w{w}": partial(loader_data, w) for w in loaders})
    t = _bench.interleaved(runs, repeats)
    for key, who in [("ours", "ours (batched tensors)")] + [
            (f"w{w}", f"torchvision DataLoader, {w} workers") for w in loaders]:
        rows.append([name, "data path only", who, f"{n_images / t[key]:,.0f}",
                     f"**{t[key] / t['ours']:.1f}x**" if key != "ours" else ""])

    # the training step, same model and batch, ours vs the loader with --workers
    torch.manual_seed(0)
    # --quick: SVHN's SmallConvNet, same input shape, a fraction of VGG16's FLOPs
    model = build_classifier((3, 32, 32), 10, {**cls_cfg, "model": "smallconv_svhn"}
                             if quick else cls_cfg)
    sgd = torch.optim.SGD(model.parameters(), lr=cls_cfg["lr"],
                          momentum=cls_cfg["momentum"],
                          weight_decay=cls_cfg["weight_decay"])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:  # train_classifier's
        return nn.functional.cross_entropy(model(augment(x[idx], gen)), labels[idx])

    def ours_train() -> None:
        train_one_epoch(model, sgd, n_model, batch, gen, batch_loss)

    def loader_train() -> None:
        model.train()
        for i, (images, y) in enumerate(loaders[workers]):
            loss = nn.functional.cross_entropy(model(images), y)
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            loss.item()
            if (i + 1) * batch >= n_model:
                break

    t = _bench.interleaved({"ours": ours_train, "loader": loader_train}, repeats)
    what = f"{'SmallConvNet' if quick else 'VGG16'} training, {n_model:,} images"
    rows.append([name, what, "ours (batched tensors)",
                 f"{n_model / t['ours']:,.1f}", ""])
    rows.append([name, what, f"torchvision DataLoader, {workers} workers",
                 f"{n_model / t['loader']:,.1f}", f"**{t['loader'] / t['ours']:.2f}x**"])
    return rows


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--images", type=int, default=10_000, help="images of the data-path pass")
    p.add_argument("--model-batches", type=int, default=2,
                   help="training batches timed with the model (default 2)")
    p.add_argument("--workers", type=int, default=1, help="loader workers (default 1)")
    args = p.parse_args()
    batch = 8 if args.quick else BATCH
    n_images = 32 if args.quick else args.images
    n_model = (2 if args.quick else args.model_batches) * batch
    report = _bench.Report("CIFAR augmentation: batched tensors against a torchvision "
                           "DataLoader", args)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n_images, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n_images,), generator=gen)
    # the pipeline's in-memory split: normalised float (N, C, H, W)
    x = (raw.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    rows = [row for setting in ("cifar10_vgg16", "cifar100_vgg16")
            for row in measure(setting, x, raw, labels, batch, n_model, args.workers,
                               args.repeats, args.quick)]
    report.add(_bench.table(["augmentation", "what", "data path", "images/s",
                             "its time / ours"], rows))
    report.add(
        f"Batch {batch}; {n_images:,} uint8 CIFAR-shaped images (random pixels) for the data "
        f"path. Fastest of {args.repeats} interleaved repeats. Loader workers are "
        f"persistent (started once, not per epoch), each with one torch thread.")
    report.close()


if __name__ == "__main__":
    main()
