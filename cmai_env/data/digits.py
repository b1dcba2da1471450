"""`digits`: scikit-learn's bundled handwritten digits (1,797 images, 8×8, no download).

The 8×8 grayscale images (values 0–16, from the UCI optical-recognition set) are scaled to
[0, 1], repeated to RGB and upsampled to ``image_size``. Each image gets one caption in one of
several phrasings ("a photo of the digit seven", "a handwritten 7", ...), fixed per image by
``split_seed``. Class names are "zero" … "nine".

The three splits are one seeded partition (default 70/15/15) of all 1,797 images, drawn from
``split_seed`` and not from ``seed``, so train, val and test never overlap whatever ``seed`` picks
the subset of ``n`` samples.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmai_env.data.base import CaptionedDataset, to_image_tensor
from cmai_env.data.folder import DEFAULT_SPLIT_FRACTIONS, check_split, sample_indices, seeded_split

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a blurry image of the digit {}."]
CAPTION_TEMPLATES = [
    "a photo of the digit {word}",
    "a handwritten {word}",
    "a handwritten {numeral}",
    "the number {word}, written by hand",
    "a low-resolution scan of the digit {numeral}",
]
_MAX_INTENSITY = 16.0  # load_digits stores 4-bit counts of set pixels in each 4×4 block


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (1797, 8, 8) in [0, 255] and integer targets, from scikit-learn.

    Cached because every split reads the same 1,797 images and callers only index (copy) them.
    """
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import and only digits needs it

    bunch = load_digits()
    pixels = np.round(bunch.images / _MAX_INTENSITY * 255.0).astype(np.uint8)
    targets = np.asarray(bunch.target, dtype=np.int64)
    pixels.setflags(write=False)
    targets.setflags(write=False)
    return pixels, targets


def digit_captions(targets: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per target digit, phrasing drawn from ``rng``."""
    choice = rng.integers(len(CAPTION_TEMPLATES), size=len(targets))
    return [
        CAPTION_TEMPLATES[int(c)].format(word=CLASS_NAMES[int(t)], numeral=int(t)) for t, c in zip(targets, choice)
    ]


def load_digits(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    root: str | Path | None = None,
    *,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
) -> CaptionedDataset:
    """The `digits` dataset (see the module docstring).

    :param split: ``train``, ``val`` or ``test``.
    :param n: at most this many samples (a seeded random subset when fewer than the split holds).
    :param seed: seed of that subset.
    :param image_size: images are upsampled (bilinear) to ``image_size × image_size``.
    :param root: ignored (the data ships with scikit-learn); accepted so every loader has one signature.
    :param split_fractions: ``(train, val, test)`` fractions of the 1,797 images.
    :param split_seed: seed of the partition and of the caption phrasings (keep it fixed across splits).
    """
    check_split("digits", split)
    pixels, targets = _digits_arrays()
    captions = digit_captions(targets, np.random.default_rng([int(split_seed), 0xD1617]))
    chosen = sample_indices(seeded_split(len(targets), split, split_seed, split_fractions), n, seed, split)
    return CaptionedDataset(
        name="digits",
        images=to_image_tensor(pixels[chosen], image_size),
        captions=[captions[i] for i in chosen.tolist()],
        labels=torch.as_tensor(targets[chosen], dtype=torch.long),
        class_names=list(CLASS_NAMES),
        templates=list(TEMPLATES),
    )
