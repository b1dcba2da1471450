"""Natural distribution shift: ImageNet-C corruptions a scenario phase can apply to the clean images.

A phase with ``corruption: {name: gaussian_noise, severity: 4}`` serves every pair of its rounds,
incoming traffic and probe set alike, with corrupted images (the attacks then perturb the corrupted
images). This is the non-adversarial half of robustness: a corruption lowers clean accuracy, which
``β_task`` training recovers and ``β_consist``/``β_adv`` training (aligning a corrupted image with
its caption, or hardening it) can cost. Scenarios that alternate shifted quiet phases with attacks
therefore give every loss weight a price somewhere, which is what makes adapting the weights pay.

The two corruptions and their five severities are those of ImageNet-C (Hendrycks & Dietterich,
ICLR 2019, ``imagenet_c/corruptions.py``): ``gaussian_noise`` adds N(0, σ²) per pixel and channel
with σ ∈ (0.08, 0.12, 0.18, 0.26, 0.38); ``contrast`` scales each image about its mean by
c ∈ (0.4, 0.3, 0.2, 0.1, 0.05); both clip to [0, 1]. Written here because the ``imagecorruptions``
package pulls in OpenCV and scikit-image for what are two lines of torch each. The noise is drawn
once per image from a generator seeded by the dataset seed (a fixed corrupted copy of the data, as
ImageNet-C is), so both fidelities see the same corrupted images.

This module is torch-free at import (scenario validation reads :data:`CORRUPTIONS` without torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Corruption name → its parameter at severities 1…5 (ImageNet-C's values).
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
}
#: Severities a scenario may name.
SEVERITIES = (1, 2, 3, 4, 5)

def corrupt_images(images: "torch.Tensor", name: str, severity: int, seed: int = 0) -> "torch.Tensor":
    """``images`` (N, 3, H, W) in [0, 1] under corruption ``name`` at ``severity`` (a new tensor).

    :param seed: seeds the noise (``gaussian_noise``); the same seed gives the same corrupted images.
    :raises ValueError: an unknown name or a severity outside 1…5 (naming what is allowed).
    """
    import torch

    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption {name!r}: severity must be one of {SEVERITIES}, got {severity!r}")
    level = CORRUPTIONS[name][severity - 1]
    if name == "gaussian_noise":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        return (images + level * noise).clamp(0.0, 1.0)
    mean = images.mean(dim=(2, 3), keepdim=True)  # per image and channel, as ImageNet-C's np.mean(x, axis=(0, 1))
    return ((images - mean) * level + mean).clamp(0.0, 1.0)


def corrupted_split(images: "torch.Tensor", key: tuple[str, int] | None, dataset_seed: int, split: str) -> "torch.Tensor":
    """The fixed corrupted copy of a scenario's ``split`` (``train`` pool or ``val`` probe set) that
    both fidelities serve for a phase with corruption ``key`` (``(name, severity)``; ``None``: the
    images unchanged). Its noise is seeded by the dataset seed, plus one for the probe set.
    """
    offsets = {"train": 0, "val": 1}
    if split not in offsets:
        raise ValueError(f"split must be one of {', '.join(offsets)}, got {split!r}")
    if key is None:
        return images
    return corrupt_images(images, key[0], key[1], dataset_seed + offsets[split])
