"""`folder`: your own images, as an ImageFolder tree or a CSV of (path, caption[, label]).

Two layouts are read:

* **ImageFolder** — ``root/<class name>/*.png|jpg|jpeg|bmp|webp`` (sub-folders inside a class
  folder are searched too). Class names are the sorted class-folder names with ``_`` read as a
  space; every caption is ``caption_template`` filled with the class name
  ("a photo of a golden retriever").
* **CSV** — a file with header ``path,caption[,label][,split]``. Paths are relative to the CSV's
  folder (absolute paths are kept). ``label`` is a class-name string; without it each distinct
  caption is its own class and the prompt template is the bare caption (``"{}"``). A ``split``
  column (values ``train``, ``val``, ``test``) fixes each row's split.

Without a ``split`` column the samples are partitioned by :func:`seeded_split` — one
permutation drawn from ``split_seed``, cut by ``split_fractions`` — so the three splits never
overlap whatever ``seed`` is used for subsampling. Class names are collected over all splits so
a label index means the same class in every split.

This module also holds the helpers the other file-backed loaders share: :func:`seeded_split`,
:func:`sample_indices` and :func:`read_image_files`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cmai_env.data.base import SPLITS, CaptionedDataset, DatasetFormatError, to_image_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
FOLDER_TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}."]
_SAMPLE_STREAM = 0x5A3B1E  # keeps subsampling draws apart from other uses of the same seed


def check_split(name: str, split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {SPLITS}")


def require_root(name: str, root: str | Path | None, expected: str) -> Path:
    """``root`` as a Path that exists; ``ValueError`` when not given, ``FileNotFoundError`` when absent."""
    if root is None:
        raise ValueError(f"{name}: root is required: {expected}")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist; expected {expected}")
    return path


def seeded_split(
    n_items: int, split: str, split_seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> np.ndarray:
    """Indices of ``split`` in a train/val/test partition of ``range(n_items)``.

    One permutation is drawn from ``split_seed`` and cut at ``round(f_train·N)`` and
    ``round((f_train + f_val)·N)``; the three splits are therefore disjoint and cover every item.

    :param n_items: number of items to partition.
    :param split: ``train``, ``val`` or ``test``.
    :param split_seed: seed of the partition (independent of any subsampling seed).
    :param fractions: ``(f_train, f_val, f_test)``, non-negative, summing to 1.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = np.random.default_rng([int(split_seed), 0x5B117]).permutation(n_items)
    cut_train = int(round(fractions[0] * n_items))
    cut_val = int(round((fractions[0] + fractions[1]) * n_items))
    bounds = {"train": (0, cut_train), "val": (cut_train, cut_val), "test": (cut_val, n_items)}
    start, stop = bounds[split]
    return order[start:stop]


def sample_indices(indices: np.ndarray, n: int | None, seed: int, split: str) -> np.ndarray:
    """At most ``n`` of ``indices``: all of them in order, or a seeded random subset.

    The subset is a prefix of one seeded permutation, so a larger ``n`` extends a smaller one.
    """
    indices = np.asarray(indices)
    if n is None or n >= len(indices):
        return indices
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), _SAMPLE_STREAM])
    return indices[rng.permutation(len(indices))[: int(n)]]


def read_image_files(paths: Sequence[Path], image_size: int, source: Path | str) -> np.ndarray:
    """Decode image files to uint8 (N, S, S, 3): RGB, centre-cropped to square, resized to S.

    Cropping before resizing keeps aspect ratios (as CLIP preprocessing does) instead of
    squashing non-square photos.

    :param paths: image files.
    :param image_size: side S of the output.
    :param source: the annotation file or folder that named these paths (for error messages).
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            raise DatasetFormatError(f"{source}: image file {path} does not exist; expected an image named by {source}")
        try:
            with Image.open(path) as img:
                square = ImageOps.fit(img.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetFormatError(f"{source}: {path} is not a readable image ({err})") from err
        out[i] = np.asarray(square, dtype=np.uint8)
    return out


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, label indices, class names) of an ImageFolder tree."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetFormatError(f"folder: {root} has no class sub-folders; expected {root}/<class name>/*.png|jpg")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        if not files:
            raise DatasetFormatError(
                f"folder: class folder {class_dir} holds no images; expected files ending in {IMAGE_EXTENSIONS}"
            )
        paths += files
        labels += [label] * len(files)
    return paths, labels, [d.name.replace("_", " ") for d in class_dirs]


def _read_csv_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a ``path,caption[,label][,split]`` CSV, with its columns checked."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "caption") if c not in columns]
        if missing:
            raise DatasetFormatError(
                f"folder: {csv_path} lacks column(s) {missing}; "
                f"expected a header 'path,caption[,label][,split]', got {columns}"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise DatasetFormatError(f"folder: {csv_path} has a header but no rows; expected one row per image")
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["caption"]:
            raise DatasetFormatError(f"folder: {csv_path} line {line}: empty 'path' or 'caption'; both are required")
        if "split" in row and row["split"] not in SPLITS:
            raise DatasetFormatError(
                f"folder: {csv_path} line {line}: split {row['split']!r}; expected one of {SPLITS}"
            )
    return rows


def _csv_classes(rows: list[dict[str, str]], csv_path: Path) -> tuple[list[int], list[str]]:
    """Label indices and class names: the ``label`` column, or one class per distinct caption."""
    key = "label" if "label" in rows[0] else "caption"
    if key == "label":
        for line, row in enumerate(rows, start=2):
            if not row["label"]:
                raise DatasetFormatError(f"folder: {csv_path} line {line}: empty 'label'; expected a class name")
    class_names = sorted({row[key] for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    return [index[row[key]] for row in rows], class_names


def _csv_split_positions(
    rows: list[dict[str, str]], split: str, split_seed: int, fractions: Sequence[float]
) -> np.ndarray:
    """Row positions of ``split``: from the ``split`` column when the CSV has one, else seeded."""
    if "split" in rows[0]:
        return np.array([i for i, row in enumerate(rows) if row["split"] == split], dtype=np.int64)
    return seeded_split(len(rows), split, split_seed, fractions)


def _check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(f"folder: caption_template must contain exactly one '{{}}', got {template!r}")
    return template


def load_folder(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    root: str | Path | None = None,
    *,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
    caption_template: str = "a photo of a {}",
    templates: Sequence[str] | None = None,
) -> CaptionedDataset:
    """Images from an ImageFolder tree or a CSV file (see the module docstring).

    :param split: ``train``, ``val`` or ``test``.
    :param n: at most this many samples (a seeded random subset when fewer than available).
    :param seed: seed of the subset drawn when ``n`` is smaller than the split.
    :param image_size: images are centre-cropped and resized to ``image_size × image_size``.
    :param root: an ImageFolder directory or a ``.csv`` file.
    :param split_fractions: ``(train, val, test)`` fractions when the split is not given by a CSV column.
    :param split_seed: seed of that partition (keep it fixed across splits).
    :param caption_template: ImageFolder caption with one ``{}`` for the class name.
    :param templates: zero-shot prompt templates (default: per layout, see the module docstring).
    """
    check_split("folder", split)
    root = require_root("folder", root, "an ImageFolder directory (root/<class>/*.png) or a CSV (path,caption[,label])")
    if root.is_dir():
        template = _check_template(caption_template)
        paths, labels, class_names = _scan_image_folder(root)
        captions = [template.format(class_names[label]) for label in labels]
        positions = seeded_split(len(paths), split, split_seed, split_fractions)
        default_templates = [template + "."] + [t for t in FOLDER_TEMPLATES if t != template + "."]
        source: Path = root
    elif root.suffix.lower() == ".csv":
        rows = _read_csv_rows(root)
        labels, class_names = _csv_classes(rows, root)
        paths = [root.parent / row["path"] for row in rows]
        captions = [row["caption"] for row in rows]
        positions = _csv_split_positions(rows, split, split_seed, split_fractions)
        default_templates = list(FOLDER_TEMPLATES) if "label" in rows[0] else ["{}"]
        source = root
    else:
        raise DatasetFormatError(f"folder: {root} is a file but not a .csv; expected an ImageFolder directory or a CSV")
    chosen = sample_indices(positions, n, seed, split).tolist()
    pixels = read_image_files([paths[i] for i in chosen], image_size, source)
    return CaptionedDataset(
        name="folder",
        images=to_image_tensor(pixels, image_size),
        captions=[captions[i] for i in chosen],
        labels=torch.as_tensor([labels[i] for i in chosen], dtype=torch.long),
        class_names=class_names,
        templates=list(templates) if templates is not None else default_templates,
    )
