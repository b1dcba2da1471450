"""`visual-genome`: Visual Genome region descriptions, read from the official JSON files.

``root`` is the Visual Genome folder as its downloads unpack::

    root/region_descriptions.json   [{"id": <image id>, "regions": [{"region_id", "image_id", "phrase",
                                                                     "x", "y", "width", "height"}, ...]}, ...]
    root/objects.json               [{"image_id": <image id>, "objects": [{"object_id", "x", "y", "w", "h",
                                                                           "names": [...], ...}, ...]}, ...]
    root/image_data.json            [{"image_id", "url", "width", "height", ...}, ...]     (optional)
    root/VG_100K/<image id>.jpg, root/VG_100K_2/<image id>.jpg   (images.zip and images2.zip)

Versions 1.0 and 1.2+ of the files are both read: an image id may be ``id`` or ``image_id``
and an object's name ``names: [...]`` or ``name``. ``regions=``, ``objects=``, ``image_data=``
and ``images=`` point at files / the image folder explicitly instead.

**Samples.** One sample per region description: the caption is its ``phrase`` and the image is
the region's box cropped out of its image (``crop=False``: the whole image), centre-cropped to
a square and resized. A box is clipped to its image (one with no area inside it is an error);
regions with an empty phrase or a zero-size box are dropped.

**Images.** With ``image_data.json`` an image's file is the folder and name of its ``url``
(``.../VG_100K_2/1.jpg`` → ``VG_100K_2/1.jpg``); without it, ``<image id>.jpg``. Each is looked
up under ``images`` (default ``root``) in that sub-folder, then in ``VG_100K``, ``VG_100K_2`` and
``images`` itself.

**Labels** come from object names (Visual Genome has no classes). The class vocabulary is
``classes=`` when given, else the ``num_classes`` most frequent object names in ``objects.json``
(lower-cased; ties broken alphabetically). With ``labels="objects"`` (default) a region's label
is the vocabulary object with the largest intersection with the region box, among the objects
that lie at least ``min_overlap`` inside it; with ``labels="phrase"`` it is the vocabulary name
the phrase mentions first (whole words, optional plural; ``objects.json`` is then only needed
for the vocabulary). Regions that get no label are dropped.

**Splits.** Visual Genome publishes no split; images (not regions, so that regions of one image
never straddle splits) are partitioned by :func:`cmai_env.data.folder.seeded_split` with
``split_seed`` and ``split_fractions``; ``seed`` and ``n`` subsample the split's regions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cmai_env.data.base import CaptionedDataset, DatasetFormatError, to_image_tensor
from cmai_env.data.coco import TEMPLATES, _keyword_patterns, keyword_label
from cmai_env.data.folder import DEFAULT_SPLIT_FRACTIONS, check_split, require_root, sample_indices, seeded_split

NAME = "visual-genome"
_LAYOUT = "root/region_descriptions.json, root/objects.json and root/VG_100K[_2]/<image id>.jpg (the Visual Genome layout)"
_IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
_BOX = {"region": ("x", "y", "width", "height"), "object": ("x", "y", "w", "h")}
LABEL_SOURCES = ("objects", "phrase")


# ---------------------------------------------------------------------------------------- JSON
def _read_list(path: Path, expected: str) -> list[Any]:
    """A JSON file holding a list (every Visual Genome file is one), with clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{NAME}: {path} does not exist; expected {expected}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{NAME}: {path} is not valid JSON ({err}); expected {expected}") from err
    if not isinstance(data, list):
        raise DatasetFormatError(f"{NAME}: {path} holds a JSON {type(data).__name__}; expected a list ({expected})")
    return data


def _require(entry: Any, fields: Sequence[str], path: Path, where: str) -> dict[str, Any]:
    missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
    if missing:
        raise DatasetFormatError(f"{NAME}: {path} {where} lacks {missing}; expected keys {list(fields)}")
    return entry


def _image_id(entry: dict[str, Any], path: Path, where: str) -> int:
    """An image entry's id: ``image_id`` (v1.2+) or ``id`` (v1.0)."""
    for key in ("image_id", "id"):
        if key in entry:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise DatasetFormatError(f"{NAME}: {path} {where}.{key} is {value!r}; expected an integer image id")
            return value
    raise DatasetFormatError(f"{NAME}: {path} {where} lacks ['image_id'] (or 'id'); expected the image's id")


def _box(entry: dict[str, Any], keys: Sequence[str], path: Path, where: str) -> tuple[float, float, float, float]:
    values = []
    for key in keys:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetFormatError(f"{NAME}: {path} {where}.{key} is {value!r}; expected a number of pixels")
        values.append(float(value))
    return values[0], values[1], values[2], values[3]


def _list_field(entry: dict[str, Any], key: str, path: Path, where: str) -> list[Any]:
    value = entry[key]
    if not isinstance(value, list):
        raise DatasetFormatError(f"{NAME}: {path} {where}.{key} is a {type(value).__name__}; expected a list")
    return value


def read_regions(path: Path) -> list[tuple[int, str, tuple[float, float, float, float]]]:
    """(image id, phrase, (x, y, w, h)) of every region in ``region_descriptions.json``, in file order."""
    data = _read_list(path, "Visual Genome region_descriptions.json: a list of {id, regions: [...]}")
    out = []
    for i, entry in enumerate(data):
        _require(entry, ("regions",), path, f"[{i}]")
        image_id = _image_id(entry, path, f"[{i}]")
        for j, region in enumerate(_list_field(entry, "regions", path, f"[{i}]")):
            where = f"[{i}].regions[{j}]"
            _require(region, ("phrase", *_BOX["region"]), path, where)
            if "image_id" in region and region["image_id"] != image_id:
                raise DatasetFormatError(
                    f"{NAME}: {path} {where}.image_id is {region['image_id']!r} but its entry's image id is {image_id}"
                )
            out.append((image_id, str(region["phrase"]).strip(), _box(region, _BOX["region"], path, where)))
    return out


def _object_name(obj: dict[str, Any], path: Path, where: str) -> str:
    if "names" in obj:
        names = obj["names"]
        if not isinstance(names, list) or not names or not isinstance(names[0], str):
            raise DatasetFormatError(f"{NAME}: {path} {where}.names is {names!r}; expected a non-empty list of strings")
        name = names[0]
    elif "name" in obj:
        name = obj["name"]
        if not isinstance(name, str):
            raise DatasetFormatError(f"{NAME}: {path} {where}.name is {name!r}; expected a string")
    else:
        raise DatasetFormatError(f"{NAME}: {path} {where} lacks ['names'] (or 'name'); expected the object's name")
    return " ".join(name.lower().split())


def read_objects(path: Path) -> dict[int, list[tuple[str, tuple[float, float, float, float]]]]:
    """{image id: [(normalised object name, (x, y, w, h))]} from ``objects.json``."""
    data = _read_list(path, "Visual Genome objects.json: a list of {image_id, objects: [...]}")
    out: dict[int, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for i, entry in enumerate(data):
        _require(entry, ("objects",), path, f"[{i}]")
        image_id = _image_id(entry, path, f"[{i}]")
        objects = out.setdefault(image_id, [])
        for j, obj in enumerate(_list_field(entry, "objects", path, f"[{i}]")):
            where = f"[{i}].objects[{j}]"
            _require(obj, _BOX["object"], path, where)
            objects.append((_object_name(obj, path, where), _box(obj, _BOX["object"], path, where)))
    return out


def read_image_data(path: Path) -> dict[int, str]:
    """{image id: relative file (``VG_100K_2/1.jpg``)} from ``image_data.json``'s urls."""
    data = _read_list(path, "Visual Genome image_data.json: a list of {image_id, url, width, height}")
    out = {}
    for i, entry in enumerate(data):
        _require(entry, ("url",), path, f"[{i}]")
        image_id = _image_id(entry, path, f"[{i}]")
        url = entry["url"]
        if not isinstance(url, str) or not url.rstrip("/"):
            raise DatasetFormatError(f"{NAME}: {path} [{i}].url is {url!r}; expected the image's URL")
        parts = url.rstrip("/").split("/")
        out[image_id] = "/".join(parts[-2:]) if len(parts) >= 2 else parts[-1]
    return out


# ---------------------------------------------------------------------------------------- labels
def vocabulary(objects: dict[int, list[tuple[str, Any]]], num_classes: int) -> list[str]:
    """The ``num_classes`` most frequent object names (ties alphabetical), sorted by frequency."""
    counts = Counter(name for items in objects.values() for name, _ in items)
    return [name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_classes]]


def _intersection(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def object_label(
    region: tuple[float, float, float, float],
    objects: list[tuple[str, tuple[float, float, float, float]]],
    index: dict[str, int],
    min_overlap: float,
) -> int | None:
    """Class of the vocabulary object with the largest intersection with ``region``.

    Only objects with ``|o ∩ r| ≥ min_overlap · |o|`` (mostly inside the region) count; ties go
    to the object listed first. None when no such object is in the vocabulary.
    """
    best: tuple[float, int] | None = None
    for name, box in objects:
        if name not in index:
            continue
        inter = _intersection(region, box)
        area = box[2] * box[3]
        if area <= 0 or inter <= 0 or inter < min_overlap * area:
            continue
        if best is None or inter > best[0]:
            best = (inter, index[name])
    return None if best is None else best[1]


# ---------------------------------------------------------------------------------------- images
def _image_path(image_id: int, relative: str | None, images: Path) -> Path:
    """Where ``image_id``'s file is: the first existing candidate (else the first, for the error)."""
    name = Path(relative).name if relative else f"{image_id}.jpg"
    candidates = [images / relative] if relative and "/" in relative else []
    candidates += [images / folder / name for folder in _IMAGE_FOLDERS] + [images / name]
    return next((p for p in candidates if p.is_file()), candidates[0])


def read_region_crops(
    items: Sequence[tuple[Path, tuple[float, float, float, float] | None]], image_size: int, source: Path
) -> np.ndarray:
    """Decode (file, box or None) pairs to uint8 (N, S, S, 3): the box cropped, then centre-cropped square.

    Each file is opened once however many of its regions are asked for.
    """
    out = np.empty((len(items), image_size, image_size, 3), dtype=np.uint8)
    order = sorted(range(len(items)), key=lambda k: str(items[k][0]))
    opened: tuple[Path, Image.Image] | None = None
    for k in order:
        path, box = items[k]
        if opened is None or opened[0] != path:
            if not path.is_file():
                raise DatasetFormatError(f"{source}: image file {path} does not exist; expected an image named by {source}")
            try:
                with Image.open(path) as img:
                    opened = (path, img.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise DatasetFormatError(f"{source}: {path} is not a readable image ({err})") from err
        img = opened[1]
        if box is not None:
            x, y, w, h = box
            left, top = max(0, int(round(x))), max(0, int(round(y)))
            right, bottom = min(img.width, int(round(x + w))), min(img.height, int(round(y + h)))
            if right <= left or bottom <= top:
                raise DatasetFormatError(
                    f"{source}: region box {box} lies outside {path} ({img.width}x{img.height}); expected a box inside the image"
                )
            img = img.crop((left, top, right, bottom))
        out[k] = np.asarray(ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC), dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------------------- loader
def _optional(path: str | Path | None, default: Path | None) -> Path | None:
    return Path(path).expanduser() if path is not None else default


def load_visual_genome(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    root: str | Path | None = None,
    *,
    regions: str | Path | None = None,
    objects: str | Path | None = None,
    image_data: str | Path | None = None,
    images: str | Path | None = None,
    classes: Sequence[str] | None = None,
    num_classes: int = 20,
    labels: str = "objects",
    min_overlap: float = 0.5,
    crop: bool = True,
    split_seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> CaptionedDataset:
    """Visual Genome region descriptions with object-name labels (see the module docstring).

    :param split: ``train``, ``val`` or ``test`` (a seeded partition of the images).
    :param n: at most this many regions (a seeded random subset when fewer are available).
    :param seed: seed of that subset.
    :param image_size: crops are centre-cropped to square and resized to ``image_size``.
    :param root: the Visual Genome folder (optional when ``regions`` and ``images`` are given).
    :param regions: ``region_descriptions.json`` (default ``root/region_descriptions.json``).
    :param objects: ``objects.json`` (default ``root/objects.json``).
    :param image_data: ``image_data.json`` (default ``root/image_data.json`` when it exists).
    :param images: folder holding ``VG_100K``/``VG_100K_2`` or the images themselves (default ``root``).
    :param classes: the class vocabulary (object names); default: the ``num_classes`` most frequent.
    :param num_classes: size of the default vocabulary.
    :param labels: ``objects`` (box overlap with named objects) or ``phrase`` (class named in the phrase).
    :param min_overlap: share of an object's box that must lie in the region (``labels="objects"``).
    :param crop: crop each region's box (True) or use the whole image (False).
    :param split_seed: seed of the image partition (keep it fixed across splits).
    :param split_fractions: ``(train, val, test)`` fractions of the images.
    """
    check_split(NAME, split)
    if labels not in LABEL_SOURCES:
        raise ValueError(f"{NAME}: labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"{NAME}: min_overlap must be in (0, 1], got {min_overlap!r}")
    if classes is None and num_classes < 1:
        raise ValueError(f"{NAME}: num_classes must be ≥ 1, got {num_classes!r}")
    if root is None and (regions is None or images is None):
        raise ValueError(f"{NAME}: root is required unless regions= and images= are both given: {_LAYOUT}")
    base = require_root(NAME, root, _LAYOUT) if root is not None else None
    regions_path = Path(regions).expanduser() if regions is not None else Path(base, "region_descriptions.json")
    image_dir = Path(images).expanduser() if images is not None else Path(base)  # type: ignore[arg-type]
    objects_path = _optional(objects, base / "objects.json" if base else None)
    image_data_path = _optional(image_data, base / "image_data.json" if base else None)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{NAME}: image folder {image_dir} does not exist; expected {_LAYOUT}")

    records = [r for r in read_regions(regions_path) if r[1]]
    need_objects = labels == "objects" or classes is None
    if need_objects and (objects_path is None or not objects_path.is_file()):
        why = "labels come from object names" if labels == "objects" else "the class vocabulary comes from object names"
        raise FileNotFoundError(
            f"{NAME}: {objects_path or 'objects.json'} does not exist; {why} "
            "(pass objects=PATH, or classes=[...] with labels='phrase')"
        )
    object_table = read_objects(objects_path) if need_objects and objects_path is not None else {}
    class_names = [" ".join(c.lower().split()) for c in classes] if classes is not None else vocabulary(object_table, num_classes)
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"{NAME}: classes must be distinct non-empty names, got {class_names!r}")
    index = {name: k for k, name in enumerate(class_names)}

    if labels == "objects":
        labelled = [(i, p, b, object_label(b, object_table.get(i, []), index, min_overlap)) for i, p, b in records]
    else:
        patterns = _keyword_patterns(class_names)
        labelled = [(i, p, b, keyword_label(p, patterns)) for i, p, b in records]
    labelled = [r for r in labelled if r[3] is not None and r[2][2] > 0 and r[2][3] > 0]
    if not labelled:
        raise DatasetFormatError(f"{NAME}: no region of {regions_path} could be given one of the classes {class_names}")

    image_ids = sorted({r[0] for r in labelled})
    in_split = {image_ids[k] for k in seeded_split(len(image_ids), split, split_seed, split_fractions)}
    positions = np.array([k for k, r in enumerate(labelled) if r[0] in in_split], dtype=np.int64)
    if len(positions) == 0:
        raise DatasetFormatError(
            f"{NAME}: split {split!r} holds no labelled region ({len(image_ids)} labelled images cut by "
            f"split_fractions {tuple(split_fractions)}); use more images or other fractions"
        )
    chosen = sample_indices(positions, n, seed, split).tolist()

    files = read_image_data(image_data_path) if image_data_path is not None and image_data_path.is_file() else {}
    items = []
    for k in chosen:
        image_id, _, box, _ = labelled[k]
        if files and image_id not in files:
            raise DatasetFormatError(f"{NAME}: {image_data_path} has no entry for image id {image_id} (named in {regions_path})")
        items.append((_image_path(image_id, files.get(image_id), image_dir), box if crop else None))
    pixels = read_region_crops(items, image_size, regions_path)
    return CaptionedDataset(
        name=NAME,
        images=to_image_tensor(pixels, image_size),
        captions=[labelled[k][1] for k in chosen],
        labels=torch.as_tensor([labelled[k][3] for k in chosen], dtype=torch.long),
        class_names=class_names,
        templates=list(TEMPLATES),
    )
