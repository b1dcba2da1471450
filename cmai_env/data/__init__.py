"""Datasets of (image in [0, 1], caption, label) with class names and prompt templates.

``load_dataset(name, ...)`` is the one entry point; ``available_datasets()`` lists the names.
Built-in generators (``shapes``, ``digits``) need no files; the real-format loaders
(``coco-captions``, ``visual-genome``, ``medmnist``, ``folder``) read the formats their projects publish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from cmai_env.data.base import SPLITS, CaptionedDataset, DatasetFormatError, to_image_tensor
from cmai_env.data.coco import load_coco_captions
from cmai_env.data.digits import load_digits
from cmai_env.data.folder import load_folder
from cmai_env.data.medmnist import load_medmnist
from cmai_env.data.shapes import load_shapes
from cmai_env.data.visual_genome import load_visual_genome

_LOADERS: dict[str, Callable[..., CaptionedDataset]] = {
    "shapes": load_shapes,
    "digits": load_digits,
    "coco-captions": load_coco_captions,
    "medmnist": load_medmnist,
    "folder": load_folder,
    "visual-genome": load_visual_genome,
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_LOADERS)


def load_dataset(
    name: str,
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    root: str | Path | None = None,
    **options,
) -> CaptionedDataset:
    """Load dataset ``name``.

    :param name: one of :func:`available_datasets`.
    :param split: ``train``, ``val`` or ``test``.
    :param n: at most this many samples (generators produce exactly ``n``; default per dataset).
    :param seed: seed for generators and subsampling.
    :param image_size: images are resized to ``image_size × image_size`` (use ``backbone.image_size``).
    :param root: file or folder for real-format loaders (required there, ignored by generators).
    :param options: loader-specific options (see each loader's docstring).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {available_datasets()}")
    kwargs = dict(split=split, n=n, seed=seed, image_size=image_size, **options)
    if root is not None:
        kwargs["root"] = Path(root)
    dataset = _LOADERS[name](**kwargs)
    if len(dataset.labels) == 0 and n != 0:
        # Every consumer (calibration, probes, batches) needs at least one pair; say so here, where
        # the file and split are known, not as an empty torch.cat much later.
        where = f" at {root}" if root is not None else ""
        raise DatasetFormatError(
            f"{name}{where}: the {split!r} split is empty (the data is too small for a {split} split); "
            "add images, or give the split explicitly (a CSV 'split' column)"
        )
    return dataset


__all__ = ["SPLITS", "CaptionedDataset", "DatasetFormatError", "available_datasets", "load_dataset", "to_image_tensor"]
