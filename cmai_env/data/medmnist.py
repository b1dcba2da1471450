"""`medmnist`: the 2D single-label MedMNIST v2 datasets, read from their published ``.npz`` files.

A MedMNIST file (``pathmnist.npz``, or ``pathmnist_64.npz`` for MedMNIST+ sizes) holds
``{train,val,test}_images`` — uint8 (N, H, W) grayscale or (N, H, W, 3) RGB — and
``{train,val,test}_labels`` shaped (N, 1). The official splits are used as they are.

The flag (``pathmnist``, ``dermamnist``, ...) is read from the file name, or given as the
``flag`` option (required when ``root`` is a folder). Class names for the known flags are
MedMNIST's own (``medmnist/info.py``, ``INFO[flag]["label"]``, MedMNIST v2); captions describe
the imaging task ("a colon pathology image of adipose"). ``chestmnist`` is multi-label and is
refused, since zero-shot classification needs one class per image. For an unknown flag pass
``label_names=[...]``; otherwise classes are named "class 0", "class 1", ... with a warning.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmai_env.data.base import SPLITS, CaptionedDataset, DatasetFormatError, to_image_tensor
from cmai_env.data.folder import check_split, require_root, sample_indices

_ORGANS = [
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
]  # fmt: skip

# INFO[flag]["label"] of MedMNIST v2, in label-index order.
LABEL_NAMES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte", "monocyte", "neutrophil", "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
        "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": _ORGANS,
    "organcmnist": _ORGANS,
    "organsmnist": _ORGANS,
}  # fmt: skip

# Phrasings per flag, from each dataset's task description; the first is the main prompt template.
PHRASINGS: dict[str, list[str]] = {
    "pathmnist": ["a colon pathology image of {}", "an H&E-stained colorectal histology patch of {}"],
    "dermamnist": ["a dermatoscopic image of {}", "a dermatoscope photo of a skin lesion: {}"],
    "octmnist": ["a retinal OCT image of {}", "an optical coherence tomography scan of the retina: {}"],
    "pneumoniamnist": ["a pediatric chest X-ray image: {}", "a chest radiograph of a child: {}"],
    "retinamnist": [
        "a retinal fundus image of diabetic retinopathy grade {}",
        "a fundus photograph, retinopathy severity {}",
    ],
    "breastmnist": ["a breast ultrasound image: {}", "a breast ultrasound scan of a {} lesion"],
    "bloodmnist": ["a blood cell microscope image of a {}", "a microscopy image of a single blood cell: {}"],
    "tissuemnist": [
        "a kidney cortex cell microscope image of {}",
        "a fluorescence microscopy image of kidney cells: {}",
    ],
    "organamnist": ["an axial abdominal CT image of the {}", "an abdominal CT slice, axial view, showing the {}"],
    "organcmnist": ["a coronal abdominal CT image of the {}", "an abdominal CT slice, coronal view, showing the {}"],
    "organsmnist": ["a sagittal abdominal CT image of the {}", "an abdominal CT slice, sagittal view, showing the {}"],
}
GENERIC_PHRASINGS = ["a medical image of {}", "a medical scan showing {}"]
MULTI_LABEL_FLAGS = ("chestmnist",)
_CAPTION_STREAM = 0x3ED5


def flag_from_path(path: Path) -> str:
    """``pathmnist`` from ``pathmnist.npz`` or the MedMNIST+ ``pathmnist_64.npz``."""
    return re.sub(r"_\d+$", "", path.stem).lower()


def _resolve_file(root: Path, flag: str | None) -> tuple[Path, str]:
    """The ``.npz`` file and its flag, from a file path or a folder plus ``flag``."""
    if root.is_dir():
        if flag is None:
            found = sorted(p.name for p in root.glob("*.npz"))
            raise ValueError(f"medmnist: {root} is a folder; pass flag=... to pick a file (found {found})")
        path = root / f"{flag}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"medmnist: {path} does not exist; expected the MedMNIST file {flag}.npz in {root}")
        return path, flag.lower()
    return root, (flag or flag_from_path(root)).lower()


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise DatasetFormatError(f"medmnist: {path} is not a readable .npz archive ({err})") from err


def _array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    if key not in archive.files:
        raise DatasetFormatError(
            f"medmnist: {path} has no key {key!r}; expected {{train,val,test}}_{{images,labels}}, found {archive.files}"
        )
    return archive[key]


def _flat_labels(labels: np.ndarray, key: str, path: Path, flag: str) -> np.ndarray:
    """(N, 1) or (N,) integer labels → (N,) int64; several columns mean a multi-label file."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DatasetFormatError(
            f"medmnist: {path} {key!r} is {labels.shape}, a multi-label array; "
            f"{flag} cannot be used for zero-shot classification, which needs one label per image"
        )
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"medmnist: {path} {key!r} is {labels.dtype} {labels.shape}; expected integers shaped (N, 1)"
        )
    return labels.reshape(-1).astype(np.int64)


def _check_images(images: np.ndarray, n_labels: int, key: str, path: Path) -> None:
    grayscale = images.ndim == 3
    colour = images.ndim == 4 and images.shape[-1] in (1, 3)
    if not (grayscale or colour):
        raise DatasetFormatError(f"medmnist: {path} {key!r} is {images.shape}; expected (N, H, W) or (N, H, W, 3)")
    if len(images) != n_labels:
        raise DatasetFormatError(f"medmnist: {path} {key!r} holds {len(images)} images but its labels {n_labels}")


def _class_names(flag: str, label_names: Sequence[str] | None, n_classes: int, path: Path) -> list[str]:
    """Class names: ``label_names``, MedMNIST's for a known flag, or "class k" with a warning."""
    if label_names is not None:
        names = [str(name) for name in label_names]
    elif flag in LABEL_NAMES:
        names = list(LABEL_NAMES[flag])
    else:
        warnings.warn(
            f"medmnist: unknown flag {flag!r} ({path.name}); naming classes 'class 0'..; pass label_names=[...]",
            stacklevel=3,
        )
        names = [f"class {k}" for k in range(n_classes)]
    if len(names) < n_classes:
        raise DatasetFormatError(f"medmnist: {path} has labels up to {n_classes - 1} but only {len(names)} class names")
    return names


def load_medmnist(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    root: str | Path | None = None,
    *,
    flag: str | None = None,
    label_names: Sequence[str] | None = None,
) -> CaptionedDataset:
    """A MedMNIST 2D dataset from its ``.npz`` file (see the module docstring).

    :param split: ``train``, ``val`` or ``test`` (MedMNIST's official splits).
    :param n: at most this many samples (a seeded random subset when fewer than the split holds).
    :param seed: seed of that subset.
    :param image_size: images are resized (bilinear) to ``image_size × image_size``.
    :param root: the ``.npz`` file, or the folder holding ``<flag>.npz``.
    :param flag: dataset name such as ``pathmnist`` (default: from the file name).
    :param label_names: class names in label order, overriding MedMNIST's (required to name an unknown flag's classes).
    """
    check_split("medmnist", split)
    root = require_root("medmnist", root, "a MedMNIST .npz file such as pathmnist.npz, or its folder with flag=...")
    path, flag = _resolve_file(root, flag)
    if flag in MULTI_LABEL_FLAGS:
        raise ValueError(f"medmnist: {flag} is multi-label; zero-shot classification needs one label per image")
    with _open_npz(path) as archive:
        # All splits' labels fix the class count, so an unknown flag gets the same names in every split.
        all_labels = {s: _flat_labels(_array(archive, f"{s}_labels", path), f"{s}_labels", path, flag) for s in SPLITS}
        labels = all_labels[split]
        images = _array(archive, f"{split}_images", path)
        _check_images(images, len(labels), f"{split}_images", path)
    every_label = np.concatenate(list(all_labels.values()))
    if every_label.size and every_label.min() < 0:
        raise DatasetFormatError(f"medmnist: {path} has negative labels; expected class indices 0..K-1")
    n_classes = int(every_label.max()) + 1 if every_label.size else 0
    class_names = _class_names(flag, label_names, n_classes, path)
    phrasings = PHRASINGS.get(flag, GENERIC_PHRASINGS)
    # Phrasing is drawn over the whole split so a sample keeps its caption whatever n is.
    phrase_of = np.random.default_rng([SPLITS.index(split), _CAPTION_STREAM]).integers(len(phrasings), size=len(labels))
    chosen = sample_indices(np.arange(len(labels)), n, seed, split)
    return CaptionedDataset(
        name=f"medmnist-{flag}",
        images=to_image_tensor(images[chosen], image_size),
        captions=[phrasings[phrase_of[i]].format(class_names[labels[i]]) for i in chosen.tolist()],
        labels=torch.as_tensor(labels[chosen], dtype=torch.long),
        class_names=class_names,
        templates=[p + "." for p in phrasings],
    )
