"""Datasets of (image in [0, 1], caption, label) with class names and prompt templates.

``load_dataset(name, ...)`` is the one entry point; ``available_datasets()`` lists the names.
Built-in generators (``shapes``, ``digits``) need no files; the real-format loaders
(``coco-captions``, ``visual-genome``, ``medmnist``, ``folder``) read the formats their projects publish.
"""

from __future__ import annotations

import importlib
import operator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cmai_env.resources import check_dataset_memory

if TYPE_CHECKING:
    from cmai_env.data.base import CaptionedDataset

#: dataset name → "module:loader"; a loader (and torch with it) is imported when it is used, so
#: that listing the names (scenario validation, ``cmai scenarios validate``) stays torch-free
_LOADERS: dict[str, str] = {
    "shapes": "cmai_env.data.shapes:load_shapes",
    "digits": "cmai_env.data.digits:load_digits",
    "coco-captions": "cmai_env.data.coco:load_coco_captions",
    "medmnist": "cmai_env.data.medmnist:load_medmnist",
    "folder": "cmai_env.data.folder:load_folder",
    "visual-genome": "cmai_env.data.visual_genome:load_visual_genome",
}
#: datasets generated in memory or shipped with a library (``root`` is not theirs to read);
#: every other loader reads the file or folder ``root``
GENERATED_DATASETS = ("digits", "shapes")
_FROM_BASE = ("SPLITS", "CaptionedDataset", "DatasetFormatError", "to_image_tensor")


def __getattr__(name: str) -> Any:
    # PEP 562: the torch-backed names of cmai_env.data.base, imported on first access
    if name not in _FROM_BASE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("cmai_env.data.base"), name)
    globals()[name] = value
    return value


def _loader(name: str) -> Callable[..., "CaptionedDataset"]:
    module, _, function = _LOADERS[name].partition(":")
    return getattr(importlib.import_module(module), function)


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
    :param n: at most this many samples (generators produce exactly ``n``; default per dataset); more
        than the free memory holds raises :class:`cmai_env.resources.ResourceError`.
    :param seed: seed for generators and subsampling.
    :param image_size: images are resized to ``image_size × image_size`` (use ``backbone.image_size``).
    :param root: file or folder for real-format loaders (required there; refused for
        :data:`GENERATED_DATASETS`, which read no files).
    :param options: loader-specific options (see each loader's docstring).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {available_datasets()}")
    for key, value, least in (("n", n, 0), ("image_size", image_size, 1), ("seed", seed, 0)):
        if value is None and key == "n":
            continue
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= least
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"load_dataset: {key} must be an integer ≥ {least}, got {value!r}")
    if name in GENERATED_DATASETS and root is not None:
        raise ValueError(f"dataset {name} is generated and reads no files; drop root={str(root)!r}")
    if n is not None:
        check_dataset_memory(name, int(n), image_size)  # refused here, not killed for memory while generating
    kwargs = dict(split=split, n=n, seed=seed, image_size=image_size, **options)
    if root is not None:
        kwargs["root"] = Path(root)
    dataset = _loader(name)(**kwargs)
    if len(dataset.labels) == 0 and n != 0:
        # Every consumer (calibration, probes, batches) needs at least one pair; say so here, where
        # the file and split are known, not as an empty torch.cat much later.
        where = f" at {root}" if root is not None else ""
        from cmai_env.data.base import DatasetFormatError

        raise DatasetFormatError(
            f"{name}{where}: the {split!r} split is empty (the data is too small for a {split} split); "
            "add images, or give the split explicitly (a CSV 'split' column)"
        )
    return dataset


__all__ = ["SPLITS", "CaptionedDataset", "DatasetFormatError", "available_datasets", "load_dataset", "to_image_tensor"]
