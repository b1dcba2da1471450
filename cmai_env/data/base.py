"""The one in-memory dataset type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what its format promises."""


@dataclass
class CaptionedDataset(torch.utils.data.Dataset):
    """Image–caption–label triples held in memory, plus what zero-shot classification needs.

    :param name: dataset name (``shapes``, ``digits``, ...).
    :param images: float tensor (N, 3, S, S) with values in [0, 1].
    :param captions: N free-text captions (the text modality of each pair).
    :param labels: long tensor (N,) of class indices into ``class_names``.
    :param class_names: the class names used for zero-shot prompts.
    :param templates: prompt templates with one ``{}`` for the class name.
    """

    name: str
    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    class_names: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (N, 3, S, S), got {tuple(self.images.shape)}")
        if len(self.captions) != n or len(self.labels) != n:
            raise ValueError(f"{self.name}: {n} images but {len(self.captions)} captions and {len(self.labels)} labels")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"{self.name}: labels outside [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        return self.images[index], self.captions[index], int(self.labels[index])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> "CaptionedDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return CaptionedDataset(
            self.name,
            self.images[idx],
            [self.captions[i] for i in idx.tolist()],
            self.labels[idx],
            self.class_names,
            self.templates,
        )

    def head(self, n: int | None) -> "CaptionedDataset":
        """The first ``n`` samples (all when ``n`` is None)."""
        return self if n is None or n >= len(self) else self.subset(range(n))

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator["CaptionedDataset"]:
        """Consecutive batches, shuffled by ``rng`` when given."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.subset(order[start : start + batch_size])

    def class_prompts(self) -> list[str]:
        """The first template applied to each class name (one caption per class)."""
        return [self.templates[0].format(c) for c in self.class_names]


def to_image_tensor(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8/float array (N, H, W[, C]) → float tensor (N, 3, S, S) in [0, 1].

    Grayscale is repeated to three channels; resizing is bilinear with antialiasing.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W) or (N, H, W, C), got {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if arr.dtype == np.uint8 or x.max() > 1.0:
        x = x / 255.0
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous()
