"""`shapes`: procedural captioned images (colour × shape), deterministic by seed.

Each image is one coloured shape at a random position and size on a noisy grey background,
rendered at 2× and box-filtered down for anti-aliasing. The caption names colour and shape in
one of several phrasings ("a red triangle", "a photo of a small red triangle", ...); the label
is the (colour, shape) class. Splits draw from independent random streams of the same seed.
"""

from __future__ import annotations

import numpy as np
import torch

from cmai_env.data.base import SPLITS, CaptionedDataset, to_image_tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 70, 225),
    "yellow": (235, 215, 30),
    "purple": (145, 50, 185),
    "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
CLASS_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
TEMPLATES = ["a {}.", "a photo of a {}.", "a drawing of a {}."]
CAPTION_TEMPLATES = [
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {size} {c} {s}",
    "a {c} {s} on a noisy background",
    "a drawing of a {size} {c} {s}",
    "the {s} is {c}",
]


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.1
    if shape == "cross":
        arm = r * 0.33
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    if shape == "triangle":  # apex up, base at cy + 0.8 r
        top, bottom = cy - r, cy + 0.8 * r
        half_width = (yy - top) / (bottom - top) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_shapes(n: int, rng: np.random.Generator, image_size: int = 32) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Render ``n`` images (uint8, N×S×S×3), captions and labels from ``rng``."""
    hi = image_size * 2
    yy, xx = np.mgrid[0:hi, 0:hi].astype(np.float32) + 0.5
    colours = list(COLOURS.values())
    colour_names = list(COLOURS)
    labels = rng.integers(0, len(CLASS_NAMES), size=n)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i, label in enumerate(labels):
        colour_idx, shape_idx = divmod(int(label), len(SHAPES))
        r = rng.uniform(0.22, 0.40) * hi
        cy, cx = rng.uniform(r * 0.9, hi - r * 0.9, size=2)
        background = rng.uniform(60, 190)
        canvas = np.full((hi, hi, 3), background, dtype=np.float32)
        canvas += rng.normal(0.0, 18.0, size=(hi, hi, 1)) + rng.normal(0.0, 6.0, size=(hi, hi, 3))
        mask = _shape_mask(SHAPES[shape_idx], yy, xx, cy, cx, r)
        colour = np.asarray(colours[colour_idx], dtype=np.float32) + rng.normal(0.0, 10.0, size=3)
        canvas[mask] = colour + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
        small = canvas.reshape(image_size, 2, image_size, 2, 3).mean(axis=(1, 3))
        images[i] = np.clip(small, 0, 255).astype(np.uint8)
        size_word = "small" if r < 0.3 * hi else "large"
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        captions.append(template.format(c=colour_names[colour_idx], s=SHAPES[shape_idx], size=size_word))
    return images, captions, labels


def load_shapes(split: str = "test", n: int | None = None, seed: int = 0, image_size: int = 32) -> CaptionedDataset:
    """The `shapes` dataset: ``n`` samples (default 1,000) of ``split``, deterministic by ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"shapes: unknown split {split!r}; expected one of {SPLITS}")
    n = 1000 if n is None else int(n)
    rng = np.random.default_rng([seed, SPLITS.index(split), 0x5A9E5])
    pixels, captions, labels = render_shapes(n, rng, image_size)
    return CaptionedDataset(
        name="shapes",
        images=to_image_tensor(pixels, image_size),
        captions=captions,
        labels=torch.as_tensor(labels, dtype=torch.long),
        class_names=list(CLASS_NAMES),
        templates=list(TEMPLATES),
    )
