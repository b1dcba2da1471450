"""`coco-captions`: MS-COCO 2017 captions, read from the official annotation layout.

``root`` is the COCO folder::

    root/annotations/captions_{train,val}2017.json
    root/annotations/instances_{train,val}2017.json   (optional, gives the class labels)
    root/{train,val}2017/*.jpg

COCO publishes captions only for train and val, so our ``test`` split reads
``captions_test2017.json`` when it exists and otherwise **the val split** — ``val`` and ``test``
are then the same images; tune on ``train`` when you evaluate on ``test``. Alternatively pass
``annotations=`` (a captions JSON) and ``images=`` (its image folder) explicitly; that file is
then the whole dataset and ``split`` only keys the subsampling stream.

**Samples.** By default one sample per image: its first caption in file order (with keyword
labels, its first caption that names a category). With
``per_caption=True`` every (image, caption) pair is a sample (about five per image).

**Labels.** COCO captions carry no class, so one is derived:

1. from the instances file (``instances_<split>2017.json`` next to the captions file, or the
   ``instances=`` option): the category of the image's largest-area object; class names are
   the instance categories in id order. Images without objects are dropped.
2. otherwise from a ``categories`` list in the captions file: the category whose name (or its
   plural) occurs earliest in the caption. Captions naming no category are dropped.

With neither, loading fails with ``FileNotFoundError`` naming the instances file it looked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmai_env.data.base import CaptionedDataset, DatasetFormatError, to_image_tensor
from cmai_env.data.folder import check_split, read_image_files, require_root, sample_indices

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a photo containing a {}."]
_COCO_LAYOUT = "root/annotations/captions_<split>2017.json and root/<split>2017/ (the COCO 2017 layout)"


def coco_paths(root: Path, split: str) -> tuple[Path, Path, Path]:
    """(captions JSON, image folder, instances JSON) of ``split`` in a COCO 2017 folder.

    ``test`` maps to COCO's val files unless ``captions_test2017.json`` exists.
    """
    coco_split = split
    if split == "test" and not (root / "annotations" / "captions_test2017.json").is_file():
        coco_split = "val"
    annotations = root / "annotations"
    return (
        annotations / f"captions_{coco_split}2017.json",
        root / f"{coco_split}2017",
        annotations / f"instances_{coco_split}2017.json",
    )


def _sibling_instances(captions_path: Path) -> Path | None:
    """``instances_X.json`` beside ``captions_X.json`` (None when the name does not follow COCO's)."""
    if not captions_path.name.startswith("captions_"):
        return None
    return captions_path.with_name("instances_" + captions_path.name[len("captions_") :])


def _read_json(path: Path, expected: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"coco-captions: {path} does not exist; expected {expected}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"coco-captions: {path} is not valid JSON ({err}); expected {expected}") from err
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise DatasetFormatError(f"coco-captions: {path} holds a {kind}; expected a JSON object ({expected})")
    return data


def _entries(data: dict[str, Any], key: str, fields: tuple[str, ...], path: Path) -> list[dict[str, Any]]:
    """``data[key]``, checked to be a list of objects that each carry ``fields``."""
    if key not in data:
        raise DatasetFormatError(f"coco-captions: {path} has no {key!r} key; expected a list of objects with {fields}")
    entries = data[key]
    if not isinstance(entries, list):
        raise DatasetFormatError(f"coco-captions: {path} {key!r} is a {type(entries).__name__}; expected a list")
    for i, entry in enumerate(entries):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise DatasetFormatError(f"coco-captions: {path} {key}[{i}] lacks {missing}; expected keys {list(fields)}")
    return entries


def _caption_records(data: dict[str, Any], path: Path) -> tuple[dict[int, str], list[tuple[int, str]]]:
    """({image id: file name}, [(image id, caption)] in file order)."""
    file_names = {e["id"]: str(e["file_name"]) for e in _entries(data, "images", ("id", "file_name"), path)}
    records = []
    for i, ann in enumerate(_entries(data, "annotations", ("image_id", "caption"), path)):
        if ann["image_id"] not in file_names:
            raise DatasetFormatError(
                f"coco-captions: {path} annotations[{i}] has image_id {ann['image_id']!r}, "
                "which no entry of 'images' has"
            )
        records.append((ann["image_id"], str(ann["caption"]).strip()))
    return file_names, records


def _category_index(data: dict[str, Any], path: Path) -> tuple[list[str], dict[int, int]]:
    """Category names in id order and {category id: class index}."""
    categories = sorted(_entries(data, "categories", ("id", "name"), path), key=lambda c: c["id"])
    return [str(c["name"]) for c in categories], {c["id"]: k for k, c in enumerate(categories)}


def _object_area(ann: dict[str, Any], path: Path, i: int) -> float:
    if "area" in ann:
        return float(ann["area"])
    if "bbox" in ann and len(ann["bbox"]) == 4:
        return float(ann["bbox"][2]) * float(ann["bbox"][3])
    raise DatasetFormatError(f"coco-captions: {path} annotations[{i}] has neither 'area' nor 'bbox'; expected one")


def instance_labels(data: dict[str, Any], path: Path) -> tuple[list[str], dict[int, int]]:
    """Class names and {image id: class index of its largest-area object} from COCO instances."""
    class_names, index = _category_index(data, path)
    best: dict[int, tuple[float, int]] = {}
    for i, ann in enumerate(_entries(data, "annotations", ("image_id", "category_id"), path)):
        if ann["category_id"] not in index:
            raise DatasetFormatError(
                f"coco-captions: {path} annotations[{i}] has category_id {ann['category_id']!r}, not in 'categories'"
            )
        area = _object_area(ann, path, i)
        if ann["image_id"] not in best or area > best[ann["image_id"]][0]:
            best[ann["image_id"]] = (area, index[ann["category_id"]])
    return class_names, {image_id: label for image_id, (_, label) in best.items()}


def keyword_label(caption: str, patterns: list[re.Pattern[str]]) -> int | None:
    """Index of the category named earliest in ``caption`` (longer name first on a tie), or None."""
    hits = [(m.start(), -len(m.group(0)), k) for k, p in enumerate(patterns) if (m := p.search(caption))]
    return min(hits)[2] if hits else None


def _keyword_patterns(class_names: list[str]) -> list[re.Pattern[str]]:
    # Whole words, with an optional plural, so "cat" does not match "scattered" but matches "cats".
    return [re.compile(rf"\b{re.escape(name)}(?:s|es)?\b", re.IGNORECASE) for name in class_names]


def _labelled_records(
    records: list[tuple[int, str]], captions_data: dict[str, Any], captions_path: Path, instances_path: Path | None
) -> tuple[list[str], list[tuple[int, str, int]]]:
    """Class names and the (image id, caption, label) records that could be labelled."""
    if instances_path is not None and instances_path.is_file():
        data = _read_json(instances_path, "COCO instances annotations (images, annotations, categories)")
        class_names, label_of = instance_labels(data, instances_path)
        return class_names, [(i, c, label_of[i]) for i, c in records if i in label_of]
    if "categories" in captions_data:
        class_names, _ = _category_index(captions_data, captions_path)
        patterns = _keyword_patterns(class_names)
        labelled = [(i, c, keyword_label(c, patterns)) for i, c in records]
        return class_names, [(i, c, label) for i, c, label in labelled if label is not None]
    wanted = instances_path or "instances_<split>2017.json (pass instances=PATH)"
    raise FileNotFoundError(
        f"coco-captions: no class labels for {captions_path}: expected the COCO instances file {wanted} "
        "or a 'categories' list in the captions file"
    )


def _resolve_files(
    root: str | Path | None,
    split: str,
    annotations: str | Path | None,
    images: str | Path | None,
    instances: str | Path | None,
) -> tuple[Path, Path, Path | None]:
    """(captions JSON, image folder, instances JSON or None) from ``root`` or the explicit options."""
    if (annotations is None) != (images is None):
        raise ValueError("coco-captions: pass annotations= and images= together (a captions JSON and its image folder)")
    if annotations is not None:
        captions_path, image_dir = Path(annotations).expanduser(), Path(images).expanduser()
        instances_path = _sibling_instances(captions_path)
    else:
        base = require_root("coco-captions", root, _COCO_LAYOUT)
        captions_path, image_dir, instances_path = coco_paths(base, split)
    if instances is not None:
        instances_path = Path(instances).expanduser()
        if not instances_path.is_file():
            raise FileNotFoundError(f"coco-captions: {instances_path} does not exist; expected COCO instances JSON")
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"coco-captions: {image_dir} does not exist; expected the folder of images named in {captions_path}"
        )
    return captions_path, image_dir, instances_path


def load_coco_captions(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    root: str | Path | None = None,
    *,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    instances: str | Path | None = None,
    per_caption: bool = False,
) -> CaptionedDataset:
    """COCO captions with derived class labels (see the module docstring).

    :param split: ``train``, ``val`` or ``test`` (``test`` reads COCO val when no test captions exist).
    :param n: at most this many samples (a seeded random subset when fewer are available).
    :param seed: seed of that subset.
    :param image_size: images are centre-cropped and resized to ``image_size × image_size``.
    :param root: the COCO folder (``annotations/`` plus ``<split>2017/``).
    :param annotations: a captions JSON, used instead of ``root`` (with ``images``).
    :param images: the folder holding the images ``annotations`` names.
    :param instances: a COCO instances JSON for the labels (default: beside the captions file).
    :param per_caption: one sample per (image, caption) pair instead of one per image.
    """
    check_split("coco-captions", split)
    captions_path, image_dir, instances_path = _resolve_files(root, split, annotations, images, instances)
    captions_data = _read_json(captions_path, "COCO captions annotations (images, annotations)")
    file_names, records = _caption_records(captions_data, captions_path)
    class_names, labelled = _labelled_records(records, captions_data, captions_path, instances_path)
    if not per_caption:
        first: dict[int, tuple[int, str, int]] = {}
        for record in labelled:
            first.setdefault(record[0], record)
        labelled = list(first.values())
    if not labelled:
        raise DatasetFormatError(f"coco-captions: no caption in {captions_path} could be given a class label")
    chosen = sample_indices(np.arange(len(labelled)), n, seed, split).tolist()
    pixels = read_image_files([image_dir / file_names[labelled[i][0]] for i in chosen], image_size, captions_path)
    return CaptionedDataset(
        name="coco-captions",
        images=to_image_tensor(pixels, image_size),
        captions=[labelled[i][1] for i in chosen],
        labels=torch.as_tensor([labelled[i][2] for i in chosen], dtype=torch.long),
        class_names=class_names,
        templates=list(TEMPLATES),
    )
