"""`visual-genome` loader on a fixture written here in the official Visual Genome JSON layout.

Every fixture image is 40×40 with a flat colour on its left 16 columns and another on its
right 16 columns (a grey band between them keeps JPEG ringing out of the boxes), so a region
crop can be recognised by its mean colour after loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmai_env.data import DatasetFormatError, available_datasets, load_dataset
from cmai_env.data.visual_genome import object_label, vocabulary

N_IMAGES = 8
LEFT_BOX = (0, 0, 16, 40)
RIGHT_BOX = (24, 0, 16, 40)


def left_colour(i: int) -> tuple[int, int, int]:
    return (20 * i + 10, 200, 40)


def right_colour(i: int) -> tuple[int, int, int]:
    return (40, 30 + 20 * i, 220)


def folder_of(i: int) -> str:
    return "VG_100K" if i <= N_IMAGES // 2 else "VG_100K_2"


def write_vg(root: Path, with_objects: bool = True, with_image_data: bool = True) -> Path:
    """A Visual Genome folder: images in VG_100K/VG_100K_2, regions, objects and image data (v1.2+ keys).

    Image i has a dog on its left, a cat on its right (image 1: ``name`` in the v1.0 style) and a
    tree over the whole picture; its regions describe the left half, the right half and a tiny
    corner that holds no whole object.
    """
    regions, objects, image_data = [], [], []
    for i in range(1, N_IMAGES + 1):
        pixels = np.full((40, 40, 3), 128, dtype=np.uint8)
        pixels[:, :16] = left_colour(i)
        pixels[:, 24:] = right_colour(i)
        path = root / folder_of(i) / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95)
        image_data.append({"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{folder_of(i)}/{i}.jpg",
                           "width": 40, "height": 40, "coco_id": None, "flickr_id": None})
        box = lambda b: dict(zip(("x", "y", "width", "height"), b))  # noqa: E731
        regions.append({"id": i, "regions": [
            {"region_id": 10 * i, "image_id": i, "phrase": f"a brown dog number {i}", **box(LEFT_BOX)},
            {"region_id": 10 * i + 1, "image_id": i, "phrase": f"Two cats, picture {i}", **box(RIGHT_BOX)},
            {"region_id": 10 * i + 2, "image_id": i, "phrase": "a corner of the sky", **box((0, 0, 4, 4))},
            {"region_id": 10 * i + 3, "image_id": i, "phrase": "   ", **box(LEFT_BOX)},  # empty phrase: dropped
        ]})
        cat = {"name": "Cat"} if i == 1 else {"names": ["cat "], "synsets": ["cat.n.01"]}
        objects.append({"image_id": i, "image_url": image_data[-1]["url"], "objects": [
            {"object_id": 100 * i, "x": 2, "y": 2, "w": 12, "h": 36, "names": ["dog"], "synsets": ["dog.n.01"]},
            {"object_id": 100 * i + 1, "x": 26, "y": 4, "w": 12, "h": 30, **cat},
            {"object_id": 100 * i + 2, "x": 0, "y": 0, "w": 40, "h": 40, "names": ["tree"], "synsets": []},
            {"object_id": 100 * i + 3, "x": 0, "y": 0, "w": 40, "h": 40, "names": ["tree"], "synsets": []},
        ]})
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    if with_objects:
        (root / "objects.json").write_text(json.dumps(objects))
    if with_image_data:
        (root / "image_data.json").write_text(json.dumps(image_data))
    return root


def colours(images: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(int(round(v)) for v in (img.mean(dim=(1, 2)) * 255).tolist()) for img in images]


def close(a, b, tol: int = 6) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) <= tol


ALL = dict(split="train", split_fractions=(1.0, 0.0, 0.0))


def test_registered():
    assert "visual-genome" in available_datasets()


def test_regions_are_cropped_captioned_and_labelled_from_objects(tmp_path):
    root = write_vg(tmp_path / "vg")
    data = load_dataset("visual-genome", root=root, image_size=12, **ALL)
    assert data.images.shape == (2 * N_IMAGES, 3, 12, 12) and data.images.dtype == torch.float32
    assert data.class_names == ["tree", "cat", "dog"]  # by frequency (16 trees, 8 cats, 8 dogs), ties alphabetical
    by_caption = dict(zip(data.captions, zip(data.labels.tolist(), colours(data.images))))
    assert set(by_caption) == {f"a brown dog number {i}" for i in range(1, 9)} | {f"Two cats, picture {i}" for i in range(1, 9)}
    for i in range(1, N_IMAGES + 1):
        label, colour = by_caption[f"a brown dog number {i}"]
        assert data.class_names[label] == "dog" and close(colour, left_colour(i))  # the crop is the left box
        label, colour = by_caption[f"Two cats, picture {i}"]
        assert data.class_names[label] == "cat" and close(colour, right_colour(i))
    # the corner region holds no whole object (the trees lie mostly outside it): dropped
    assert "a corner of the sky" not in by_caption


def test_vocabulary_size_and_explicit_classes(tmp_path):
    root = write_vg(tmp_path / "vg")
    two = load_dataset("visual-genome", root=root, num_classes=2, **ALL)
    assert two.class_names == ["tree", "cat"] and len(two) == N_IMAGES  # dog regions have no class now
    assert all(c.startswith("Two cats") for c in two.captions)
    mine = load_dataset("visual-genome", root=root, classes=["Dog"], **ALL)
    assert mine.class_names == ["dog"] and len(mine) == N_IMAGES and set(mine.labels.tolist()) == {0}
    with pytest.raises(ValueError, match="distinct"):
        load_dataset("visual-genome", root=root, classes=["cat", "cat"], **ALL)


def test_splits_partition_images_and_subsets_are_seeded(tmp_path):
    root = write_vg(tmp_path / "vg")
    fractions = (0.5, 0.25, 0.25)
    parts = {s: load_dataset("visual-genome", root=root, split=s, split_fractions=fractions) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [8, 4, 4]  # 4, 2 and 2 images, two regions each
    numbers = {s: {c.rsplit(" ", 1)[1] for c in p.captions} for s, p in parts.items()}
    assert numbers["train"].isdisjoint(numbers["val"]) and numbers["val"].isdisjoint(numbers["test"])
    assert set().union(*numbers.values()) == {str(i) for i in range(1, 9)}  # regions of one image stay together
    a = load_dataset("visual-genome", root=root, n=5, seed=3, **ALL)
    b = load_dataset("visual-genome", root=root, n=5, seed=3, **ALL)
    c = load_dataset("visual-genome", root=root, n=5, seed=4, **ALL)
    assert a.captions == b.captions and torch.equal(a.images, b.images) and a.captions != c.captions


def test_whole_images_phrase_labels_and_no_image_data(tmp_path):
    root = write_vg(tmp_path / "vg", with_objects=False, with_image_data=False)
    data = load_dataset("visual-genome", root=root, labels="phrase", classes=["dog", "cat", "sky"], crop=False, image_size=40, **ALL)
    named = {c: data.class_names[k] for c, k in zip(data.captions, data.labels.tolist())}
    assert named["a brown dog number 3"] == "dog" and named["Two cats, picture 3"] == "cat"  # plural matches
    assert named["a corner of the sky"] == "sky" and len(data) == 3 * N_IMAGES
    whole = dict(zip(data.captions, colours(data.images)))["a brown dog number 5"]
    expected = [(16 * lc + 8 * 128 + 16 * rc) / 40 for lc, rc in zip(left_colour(5), right_colour(5))]
    assert close(whole, expected)  # crop=False: the whole picture (found in VG_100K_2 without image_data)


def test_object_label_prefers_the_largest_inside_object():
    index = {"dog": 0, "cat": 1}
    objects = [("cat", (0.0, 0.0, 10.0, 10.0)), ("dog", (0.0, 0.0, 20.0, 20.0)), ("dog", (50.0, 50.0, 5.0, 5.0))]
    assert object_label((0, 0, 30, 30), objects, index, 0.5) == 0
    assert object_label((0, 0, 12, 12), objects, index, 0.5) == 1  # the dog lies only 36% inside
    assert object_label((0, 0, 12, 12), objects, index, 0.3) == 0
    assert object_label((100, 100, 5, 5), objects, index, 0.5) is None
    assert vocabulary({1: [("b", None), ("a", None)], 2: [("b", None)]}, 5) == ["b", "a"]


def test_missing_files_and_images(tmp_path):
    with pytest.raises(ValueError, match="root is required"):
        load_dataset("visual-genome")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("visual-genome", root=tmp_path / "nowhere")
    root = write_vg(tmp_path / "vg", with_objects=False)
    with pytest.raises(FileNotFoundError, match=r"objects\.json does not exist; labels come from object names"):
        load_dataset("visual-genome", root=root, **ALL)
    with pytest.raises(FileNotFoundError, match="class vocabulary"):
        load_dataset("visual-genome", root=root, labels="phrase", **ALL)
    (root / "region_descriptions.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"region_descriptions\.json does not exist"):
        load_dataset("visual-genome", root=root, classes=["dog"], labels="phrase", **ALL)
    root = write_vg(tmp_path / "vg2")
    (root / "VG_100K_2" / "7.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"VG_100K_2/7\.jpg does not exist"):
        load_dataset("visual-genome", root=root, **ALL)
    root = write_vg(tmp_path / "vg3")
    (root / "VG_100K" / "2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match=r"2\.jpg is not a readable image"):
        load_dataset("visual-genome", root=root, **ALL)


def _corrupt(path: Path, change) -> None:
    data = json.loads(path.read_text())
    changed = change(data)
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))


@pytest.mark.parametrize(
    "file, change, match",
    [
        ("region_descriptions.json", lambda d: "[{oops", r"region_descriptions\.json is not valid JSON"),
        ("region_descriptions.json", lambda d: {"regions": d}, r"holds a JSON dict; expected a list"),
        ("region_descriptions.json", lambda d: [{"id": 1}], r"\[0\] lacks \['regions'\]"),
        ("region_descriptions.json", lambda d: [{"regions": []}], r"\[0\] lacks \['image_id'\] \(or 'id'\)"),
        ("region_descriptions.json", lambda d: [{**d[0], "regions": [{"phrase": "x", "x": 0, "y": 0, "width": 3}]}],
         r"\[0\]\.regions\[0\] lacks \['height'\]"),
        ("region_descriptions.json", lambda d: [{**d[0], "regions": [{**d[0]["regions"][0], "image_id": 5}]}],
         r"regions\[0\]\.image_id is 5 but its entry's image id is 1"),
        ("region_descriptions.json", lambda d: [{**d[0], "regions": [{**d[0]["regions"][0], "x": "left"}]}],
         r"regions\[0\]\.x is 'left'; expected a number"),
        ("objects.json", lambda d: [{**d[0], "objects": [{"x": 0, "y": 0, "w": 1, "h": 1}]}],
         r"objects\.json \[0\]\.objects\[0\] lacks \['names'\] \(or 'name'\)"),
        ("objects.json", lambda d: [{**d[0], "objects": [{"x": 0, "y": 0, "w": 1, "h": 1, "names": []}]}],
         r"objects\[0\]\.names is \[\]; expected a non-empty list"),
        ("image_data.json", lambda d: d[1:], r"image_data\.json has no entry for image id 1"),
        ("image_data.json", lambda d: [{"image_id": 1}], r"image_data\.json \[0\] lacks \['url'\]"),
    ],
)
def test_malformed_files(tmp_path, file, change, match):
    root = write_vg(tmp_path / "vg")
    _corrupt(root / file, change)
    with pytest.raises(DatasetFormatError, match=match):
        load_dataset("visual-genome", root=root, **ALL)


def test_bad_options(tmp_path):
    root = write_vg(tmp_path / "vg")
    with pytest.raises(ValueError, match="labels must be one of"):
        load_dataset("visual-genome", root=root, labels="captions", **ALL)
    with pytest.raises(ValueError, match="min_overlap"):
        load_dataset("visual-genome", root=root, min_overlap=0.0, **ALL)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("visual-genome", root=root, split="holdout")
    with pytest.raises(DatasetFormatError, match="split 'val' holds no labelled region"):
        load_dataset("visual-genome", root=root, split="val", split_fractions=(1.0, 0.0, 0.0))
