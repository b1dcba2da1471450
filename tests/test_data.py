"""Dataset loaders: shapes and digits generators, and the real-format COCO, MedMNIST and folder readers.

The file-backed loaders read tiny fixtures written here in the exact published formats
(COCO 2017 JSON + JPEGs, MedMNIST ``.npz``, ImageFolder PNGs, CSV). Each fixture image has
its own flat colour, so an image can be recognised after loading and resizing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmai_env.data import DatasetFormatError, available_datasets, load_dataset
from cmai_env.data.coco import keyword_label, _keyword_patterns
from cmai_env.data.folder import sample_indices, seeded_split
from cmai_env.data.medmnist import LABEL_NAMES
from cmai_env.data.shapes import CLASS_NAMES as SHAPE_CLASSES


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> Path:
    """A flat-colour image at ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def mean_colours(images: torch.Tensor) -> list[tuple[int, int, int]]:
    """Per-image mean colour in 0..255, rounded (recovers a flat fixture colour)."""
    return [tuple(int(round(v)) for v in (img.mean(dim=(1, 2)) * 255).tolist()) for img in images]


def check_dataset(data, image_size: int) -> None:
    """Invariants every loader promises."""
    assert data.images.dtype == torch.float32 and data.images.shape[1:] == (3, image_size, image_size)
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert data.labels.dtype == torch.long and len(data.captions) == len(data.labels) == len(data.images)
    assert all("{}" in t for t in data.templates)


# ---------------------------------------------------------------------------------------- registry


def test_registry_lists_every_loader():
    assert {"shapes", "digits", "coco-captions", "medmnist", "folder"} <= set(available_datasets())
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet-9000")


def test_unknown_split_is_refused():
    for name in ("shapes", "digits"):
        with pytest.raises(ValueError, match="split"):
            load_dataset(name, split="validation")


# ---------------------------------------------------------------------------------------- split helpers


def test_seeded_split_partitions_and_ignores_subsample_seed():
    parts = [seeded_split(101, s, split_seed=3) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [71, 15, 15]
    assert sorted(np.concatenate(parts).tolist()) == list(range(101))
    assert not np.array_equal(seeded_split(101, "test", split_seed=3), seeded_split(101, "test", split_seed=4))
    with pytest.raises(ValueError, match="split_fractions"):
        seeded_split(10, "train", fractions=(0.5, 0.5, 0.5))


def test_sample_indices_is_seeded_and_nested():
    pool = np.arange(100, 200)
    small, large = sample_indices(pool, 5, seed=1, split="val"), sample_indices(pool, 8, seed=1, split="val")
    assert np.array_equal(large[:5], small) and set(small) <= set(pool)
    assert not np.array_equal(small, sample_indices(pool, 5, seed=2, split="val"))
    assert np.array_equal(sample_indices(pool, None, seed=1, split="val"), pool)


# ---------------------------------------------------------------------------------------- shapes


def test_shapes_deterministic_by_seed_and_split():
    a = load_dataset("shapes", split="test", n=12, seed=4, image_size=16)
    b = load_dataset("shapes", split="test", n=12, seed=4, image_size=16)
    check_dataset(a, 16)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.labels, b.labels)
    other_seed = load_dataset("shapes", split="test", n=12, seed=5, image_size=16)
    train = load_dataset("shapes", split="train", n=12, seed=4, image_size=16)
    assert not torch.equal(a.images, other_seed.images) and not torch.equal(a.images, train.images)


def test_shapes_captions_name_the_labelled_class():
    data = load_dataset("shapes", split="val", n=40, seed=0, image_size=16)
    assert data.class_names == SHAPE_CLASSES
    for caption, label in zip(data.captions, data.labels.tolist()):
        colour, shape = data.class_names[label].split()
        assert colour in caption and shape in caption, (caption, data.class_names[label])


# ---------------------------------------------------------------------------------------- digits


def test_digits_end_to_end_through_registry():
    data = load_dataset("digits", split="test", n=20, seed=0, image_size=24)
    check_dataset(data, 24)
    assert len(data) == 20 and data.class_names[7] == "seven"
    assert data.class_prompts()[3] == "a photo of the digit three."
    for caption, label in zip(data.captions, data.labels.tolist()):
        assert data.class_names[label] in caption or str(label) in caption.split()
    assert float(data.images.max()) > 0.9 and float(data.images.min()) < 0.05  # ink and paper both present
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # grayscale repeated to RGB


def test_digits_splits_cover_all_images_and_seed_only_subsamples():
    sizes = [len(load_dataset("digits", split=s, image_size=8)) for s in ("train", "val", "test")]
    assert sizes == [1258, 269, 270] and sum(sizes) == 1797
    full_a = load_dataset("digits", split="test", seed=0, image_size=8)
    full_b = load_dataset("digits", split="test", seed=9, image_size=8)
    assert torch.equal(full_a.images, full_b.images)  # the partition does not move with seed
    sub_a = load_dataset("digits", split="test", n=10, seed=0, image_size=8)
    sub_b = load_dataset("digits", split="test", n=10, seed=0, image_size=8)
    sub_c = load_dataset("digits", split="test", n=10, seed=1, image_size=8)
    assert torch.equal(sub_a.images, sub_b.images) and sub_a.captions == sub_b.captions
    assert not torch.equal(sub_a.labels, sub_c.labels) or not torch.equal(sub_a.images, sub_c.images)
    moved = load_dataset("digits", split="test", image_size=8, split_seed=1)
    assert not torch.equal(full_a.images, moved.images)


# ---------------------------------------------------------------------------------------- COCO

COCO_CATEGORIES = [{"id": 3, "name": "car"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
COCO_COLOURS = {1: (200, 20, 20), 2: (20, 200, 20), 3: (20, 20, 200), 4: (200, 200, 20)}
COCO_CAPTIONS = [
    (1, "A cat sleeping on a dog bed."),
    (1, "Two dogs and one cat."),
    (2, "A red car parked near a dog."),
    (2, "A street with a car."),
    (3, "Dogs running on the beach."),
    (3, "Some dogs playing."),
    (4, "An empty room with scattered chairs."),  # names no category; has no instances either
]
# image 1: small dog, large cat → cat; image 2: car; image 3: dog; image 4: no objects.
COCO_INSTANCES = [(1, 18, 50.0), (1, 17, 900.0), (2, 3, 400.0), (3, 18, 300.0)]


def write_coco(root: Path, coco_split: str = "val", with_instances: bool = True, with_categories: bool = False) -> Path:
    """A COCO 2017 folder with four JPEGs, captions and (optionally) instances."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 40, "width": 40} for i in COCO_COLOURS]
    for i, colour in COCO_COLOURS.items():
        write_image(root / f"{coco_split}2017" / f"{i:012d}.jpg", colour)
    captions = {
        "info": {"description": "fixture"},
        "images": images,
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(COCO_CAPTIONS)],
    }
    if with_categories:
        captions["categories"] = COCO_CATEGORIES
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{coco_split}2017.json").write_text(json.dumps(captions))
    if with_instances:
        instances = {
            "images": images,
            "categories": COCO_CATEGORIES,
            "annotations": [
                {"id": k, "image_id": i, "category_id": c, "area": a, "bbox": [0, 0, 10, 10], "iscrowd": 0}
                for k, (i, c, a) in enumerate(COCO_INSTANCES)
            ],
        }
        (root / "annotations" / f"instances_{coco_split}2017.json").write_text(json.dumps(instances))
    return root


def test_coco_labels_from_largest_instance(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = load_dataset("coco-captions", split="val", root=root, image_size=20)
    check_dataset(data, 20)
    assert data.class_names == ["car", "cat", "dog"]
    assert data.captions == [COCO_CAPTIONS[0][1], COCO_CAPTIONS[2][1], COCO_CAPTIONS[4][1]]  # first caption per image
    assert [data.class_names[k] for k in data.labels.tolist()] == ["cat", "car", "dog"]
    colours = mean_colours(data.images)
    for got, want in zip(colours, [COCO_COLOURS[1], COCO_COLOURS[2], COCO_COLOURS[3]]):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 6  # JPEG round trip


def test_coco_test_reads_val_and_per_caption_mode(tmp_path):
    root = write_coco(tmp_path / "coco")
    val = load_dataset("coco-captions", split="val", root=root)
    test = load_dataset("coco-captions", split="test", root=root)
    assert test.captions == val.captions
    pairs = load_dataset("coco-captions", split="val", root=root, per_caption=True)
    assert len(pairs) == 6 and pairs.labels.tolist() == [1, 1, 0, 0, 2, 2]
    sub = load_dataset("coco-captions", split="val", root=root, per_caption=True, n=3, seed=2)
    again = load_dataset("coco-captions", split="val", root=root, per_caption=True, n=3, seed=2)
    assert len(sub) == 3 and sub.captions == again.captions and set(sub.captions) <= set(pairs.captions)


def test_coco_keyword_labels_and_explicit_paths(tmp_path):
    root = write_coco(tmp_path / "coco", with_instances=False, with_categories=True)
    data = load_dataset(
        "coco-captions",
        annotations=root / "annotations" / "captions_val2017.json",
        images=root / "val2017",
        per_caption=True,
    )
    by_caption = dict(zip(data.captions, (data.class_names[k] for k in data.labels.tolist())))
    assert by_caption["Two dogs and one cat."] == "dog"  # earliest mention wins
    assert by_caption["A red car parked near a dog."] == "car"
    assert "An empty room with scattered chairs." not in by_caption  # "cat" inside "scattered" is no match
    assert len(data) == 6
    assert keyword_label("a hot dog", _keyword_patterns(["dog", "hot dog"])) == 1


def test_coco_without_any_labels_names_the_instances_file(tmp_path):
    root = write_coco(tmp_path / "coco", with_instances=False, with_categories=False)
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        load_dataset("coco-captions", split="val", root=root)


def test_coco_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("coco-captions", root=tmp_path / "nowhere")
    root = write_coco(tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        load_dataset("coco-captions", split="train", root=root)
    (root / "val2017" / f"{2:012d}.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"000000000002\.jpg"):
        load_dataset("coco-captions", split="val", root=root)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: "{not json", r"captions_val2017\.json is not valid JSON"),
        (lambda d: {k: v for k, v in d.items() if k != "annotations"}, r"no 'annotations' key"),
        (lambda d: {**d, "images": [{"id": 1}]}, r"images\[0\] lacks \['file_name'\]"),
        (lambda d: {**d, "annotations": [{"image_id": 99, "caption": "x"}]}, r"image_id 99"),
    ],
)
def test_coco_malformed_captions(tmp_path, corrupt, match):
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_val2017.json"
    broken = corrupt(json.loads(path.read_text()))
    path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(DatasetFormatError, match=match):
        load_dataset("coco-captions", split="val", root=root)


def test_coco_malformed_instances(tmp_path):
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"instances_val2017\.json.*category_id 999"):
        load_dataset("coco-captions", split="val", root=root)


# ---------------------------------------------------------------------------------------- MedMNIST


def write_medmnist(path: Path, rgb: bool = True, sizes=(6, 3, 4), n_classes: int = 9, drop: str | None = None) -> Path:
    """A MedMNIST-format .npz: image k of a split is flat grey/colour value 10·k + split offset."""
    arrays = {}
    for offset, (split, count) in enumerate(zip(("train", "val", "test"), sizes)):
        values = (10 * np.arange(count) + 100 * offset).astype(np.uint8)
        shape = (count, 28, 28, 3) if rgb else (count, 28, 28)
        arrays[f"{split}_images"] = np.broadcast_to(values.reshape(-1, *[1] * (len(shape) - 1)), shape).copy()
        arrays[f"{split}_labels"] = (np.arange(count) % n_classes).astype(np.uint8).reshape(-1, 1)
    if drop:
        del arrays[drop]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_medmnist_pathmnist(tmp_path):
    path = write_medmnist(tmp_path / "pathmnist.npz")
    data = load_dataset("medmnist", split="train", root=path, image_size=16)
    check_dataset(data, 16)
    assert data.class_names == LABEL_NAMES["pathmnist"] and len(data.class_names) == 9
    assert data.class_names[0] == "adipose" and data.class_names[8] == "colorectal adenocarcinoma epithelium"
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.captions[0].endswith("adipose") and "colon" in data.captions[0] + data.captions[1]
    for caption, label in zip(data.captions, data.labels.tolist()):
        assert data.class_names[label] in caption
    torch.testing.assert_close(data.images[:, :, 5, 5], (10 * torch.arange(6.0) / 255).unsqueeze(1).expand(6, 3))
    test = load_dataset("medmnist", split="test", root=path)
    assert len(test) == 4 and abs(float(test.images[1].mean()) - 210 / 255) < 1e-4  # official test split


def test_medmnist_gray_folder_flag_and_subsets(tmp_path):
    write_medmnist(tmp_path / "pneumoniamnist.npz", rgb=False, sizes=(20, 4, 4), n_classes=2)
    data = load_dataset("medmnist", split="train", root=tmp_path, flag="pneumoniamnist", n=5, seed=3)
    again = load_dataset("medmnist", split="train", root=tmp_path, flag="pneumoniamnist", n=5, seed=3)
    other = load_dataset("medmnist", split="train", root=tmp_path, flag="pneumoniamnist", n=5, seed=4)
    check_dataset(data, 32)
    assert data.class_names == ["normal", "pneumonia"] and "chest X-ray" in data.templates[0]
    assert torch.equal(data.images, again.images) and data.captions == again.captions
    assert not torch.equal(data.images, other.images)
    assert torch.equal(data.images[:, 0], data.images[:, 1])
    plus = write_medmnist(tmp_path / "plus" / "dermamnist_64.npz", n_classes=7)
    assert load_dataset("medmnist", root=plus).class_names == LABEL_NAMES["dermamnist"]


def test_medmnist_unknown_flag_and_multilabel(tmp_path):
    path = write_medmnist(tmp_path / "mymnist.npz", n_classes=3)
    with pytest.warns(UserWarning, match="label_names"):
        data = load_dataset("medmnist", root=path)
    assert data.class_names == ["class 0", "class 1", "class 2"]
    named = load_dataset("medmnist", root=path, label_names=["a", "b", "c"])
    assert named.class_names == ["a", "b", "c"]
    assert named.captions[1] in {"a medical image of b", "a medical scan showing b"}
    with pytest.raises(DatasetFormatError, match="class names"):
        load_dataset("medmnist", root=path, label_names=["a"])
    chest = write_medmnist(tmp_path / "chestmnist.npz", rgb=False, n_classes=2)
    with pytest.raises(ValueError, match="multi-label"):
        load_dataset("medmnist", root=chest)


def test_medmnist_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="pathmnist.npz"):
        load_dataset("medmnist", root=tmp_path / "pathmnist.npz")
    with pytest.raises(FileNotFoundError, match="bloodmnist.npz"):
        load_dataset("medmnist", root=tmp_path, flag="bloodmnist")
    with pytest.raises(ValueError, match="flag"):
        load_dataset("medmnist", root=tmp_path)
    with pytest.raises(ValueError, match="root is required"):
        load_dataset("medmnist")


def test_medmnist_malformed_files(tmp_path):
    missing_key = write_medmnist(tmp_path / "a" / "pathmnist.npz", drop="val_labels")
    with pytest.raises(DatasetFormatError, match=r"pathmnist\.npz has no key 'val_labels'"):
        load_dataset("medmnist", root=missing_key)
    flat = tmp_path / "b" / "bloodmnist.npz"
    flat.parent.mkdir()
    good = dict(np.load(write_medmnist(tmp_path / "c" / "bloodmnist.npz", n_classes=8)))
    np.savez(flat, **{**good, "test_images": np.zeros((4, 784), np.uint8)})
    with pytest.raises(DatasetFormatError, match=r"'test_images' is \(4, 784\)"):
        load_dataset("medmnist", root=flat)
    short = tmp_path / "d" / "bloodmnist.npz"
    short.parent.mkdir()
    np.savez(short, **{**good, "test_labels": good["test_labels"][:2]})
    with pytest.raises(DatasetFormatError, match="4 images but its labels 2"):
        load_dataset("medmnist", root=short)
    not_npz = tmp_path / "octmnist.npz"
    not_npz.write_text("not an archive")
    with pytest.raises(DatasetFormatError, match=r"octmnist\.npz is not a readable \.npz"):
        load_dataset("medmnist", root=not_npz)


# ---------------------------------------------------------------------------------------- folder


def colour_of(index: int) -> tuple[int, int, int]:
    return (10 * index, 255 - 10 * index, 128)


def write_image_folder(root: Path, per_class: int = 10) -> dict[tuple[int, int, int], str]:
    """root/golden_retriever/*.png and root/tabby_cat/*.png (plus a stray .txt); returns {colour: class name}."""
    truth = {}
    for c, (name, suffix) in enumerate([("golden_retriever", ".png"), ("tabby_cat", ".png")]):
        for k in range(per_class):
            colour = colour_of(c * per_class + k)
            write_image(root / name / f"img{k}{suffix}", colour)
            truth[colour] = name.replace("_", " ")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    return truth


def test_image_folder_splits_labels_and_captions(tmp_path):
    truth = write_image_folder(tmp_path / "pets")
    seen = set()
    for split in ("train", "val", "test"):
        data = load_dataset("folder", split=split, root=tmp_path / "pets", image_size=12)
        check_dataset(data, 12)
        assert data.class_names == ["golden retriever", "tabby cat"]
        colours = mean_colours(data.images)
        assert seen.isdisjoint(colours)
        seen.update(colours)
        for colour, caption, label in zip(colours, data.captions, data.labels.tolist()):
            assert truth[colour] == data.class_names[label] and caption == f"a photo of a {truth[colour]}"
    assert seen == set(truth)  # 14 + 3 + 3 images, every one exactly once
    custom = load_dataset("folder", split="train", root=tmp_path / "pets", caption_template="a pet: {}", n=2, seed=1)
    assert custom.captions[0].startswith("a pet: ") and custom.templates[0] == "a pet: {}."


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_with_labels_and_split_column(tmp_path):
    for k in range(6):
        write_image(tmp_path / "imgs" / f"{k}.jpg" if k % 2 else tmp_path / "imgs" / f"{k}.png", colour_of(k))
    rows = [
        [f"imgs/{k}.{'jpg' if k % 2 else 'png'}", f"photo number {k}", "odd" if k % 2 else "even", split]
        for k, split in enumerate(["train", "train", "train", "val", "test", "test"])
    ]
    path = write_csv(tmp_path / "data.csv", ["path", "caption", "label", "split"], rows)
    test = load_dataset("folder", split="test", root=path, image_size=8)
    assert test.captions == ["photo number 4", "photo number 5"]
    assert test.class_names == ["even", "odd"] and test.labels.tolist() == [0, 1]
    assert test.templates[0] == "a photo of a {}."
    assert len(load_dataset("folder", split="train", root=path)) == 3


def test_csv_captions_as_classes_with_seeded_split(tmp_path):
    for k in range(10):
        write_image(tmp_path / f"{k}.png", colour_of(k))
    captions = ["a red fish", "a blue boat"]
    path = write_csv(tmp_path / "pairs.csv", ["path", "caption"], [[f"{k}.png", captions[k % 2]] for k in range(10)])
    splits = {
        s: load_dataset("folder", split=s, root=path, split_fractions=(0.6, 0.2, 0.2)) for s in ("train", "val", "test")
    }
    assert [len(d) for d in splits.values()] == [6, 2, 2]
    data = splits["train"]
    assert data.class_names == ["a blue boat", "a red fish"] and data.templates == ["{}"]
    assert all(data.class_names[label] == caption for caption, label in zip(data.captions, data.labels.tolist()))
    assert data.class_prompts() == data.class_names


def test_folder_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_dataset("folder", root=tmp_path / "missing.csv")
    path = write_csv(tmp_path / "data.csv", ["path", "caption"], [["gone.png", "a ghost"]] * 3)
    with pytest.raises(DatasetFormatError, match=r"gone\.png does not exist"):
        load_dataset("folder", split="train", root=path)


def test_folder_malformed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="no class sub-folders"):
        load_dataset("folder", root=tmp_path / "empty")
    (tmp_path / "empty" / "cats").mkdir()
    with pytest.raises(DatasetFormatError, match="cats holds no images"):
        load_dataset("folder", root=tmp_path / "empty")
    no_caption = write_csv(tmp_path / "a.csv", ["file", "text"], [["x.png", "y"]])
    with pytest.raises(DatasetFormatError, match=r"a\.csv lacks column\(s\) \['path', 'caption'\]"):
        load_dataset("folder", root=no_caption)
    bad_split = write_csv(tmp_path / "b.csv", ["path", "caption", "split"], [["x.png", "y", "holdout"]])
    with pytest.raises(DatasetFormatError, match=r"b\.csv line 2: split 'holdout'"):
        load_dataset("folder", root=bad_split)
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DatasetFormatError, match="not a .csv"):
        load_dataset("folder", root=tmp_path / "data.json")
    write_image(tmp_path / "broken" / "c" / "bad.png", (0, 0, 0))
    (tmp_path / "broken" / "c" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match=r"bad\.png is not a readable image"):
        load_dataset("folder", split="train", root=tmp_path / "broken", split_fractions=(1, 0, 0))
