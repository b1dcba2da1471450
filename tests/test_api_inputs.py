"""The library's public functions take the inputs users hand them, or say what is wrong with them.

Each case below used to fail deep inside torch or numpy (or silently did something else):
float64 images ("expected scalar type Double but found Float"), int32 labels ("expected target
dtype to be Long"), ``load_dataset(n=-1)`` (numpy's "negative dimensions"), ``evaluate`` before
``calibrate`` (a ``TypeError`` on ``float(None)``), ``fit(batch_size=0)`` (``ZeroDivisionError``),
``--param eps=0.5/255`` (``Fraction`` refusing the decimal numerator), and the ``contrast``
corruption greying colours (one mean over all channels, where ImageNet-C takes one per channel).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmai_env.attacks import PairBatch, ZeroShotTask, make_attack
from cmai_env.consistency import ConsistencyDetector
from cmai_env.corruptions import corrupt_images
from cmai_env.data import load_dataset
from cmai_env.keyvalue import parse_value
from cmai_env.robustness import evaluate_attack
from cmai_env.training import ModalityBridgingTrainer, TrainerConfig


@pytest.fixture(scope="module")
def data(backbone):
    return load_dataset("shapes", split="test", n=8, seed=3, image_size=backbone.image_size)


@pytest.fixture(scope="module")
def task(backbone, data):
    return ZeroShotTask.from_dataset(backbone, data)


def test_float64_images_and_int32_labels_are_attacked_like_the_defaults(backbone, task, data):
    batch = PairBatch.from_dataset(backbone, data)
    odd = PairBatch(batch.images.double(), batch.tokens, batch.labels.int())
    assert odd.labels.dtype == torch.long
    attack = make_attack("pgd_linf", eps=8 / 255, steps=2)
    expected = evaluate_attack(task, batch, attack, generator=torch.Generator().manual_seed(0))
    got = evaluate_attack(task, odd, attack, generator=torch.Generator().manual_seed(0))
    assert got.clean_accuracy == expected.clean_accuracy
    assert abs(got.asr - expected.asr) <= 1 / len(data)
    with pytest.raises(ValueError, match="float images with pixels in \\[0, 1\\], got dtype torch.uint8"):
        backbone.encode_image((batch.images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="integer class indices, got dtype torch.float32"):
        PairBatch(batch.images, batch.tokens, batch.labels.float())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n": -1}, "n must be an integer ≥ 0, got -1"), ({"n": 1.5}, "n must be an integer ≥ 0, got 1.5"),
     ({"image_size": 0}, "image_size must be an integer ≥ 1, got 0"), ({"seed": -1}, "seed must be an integer ≥ 0, got -1")],
)
def test_load_dataset_names_a_bad_size_or_seed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("shapes", **{"n": 4, **kwargs})


def test_the_detector_says_to_calibrate_before_evaluate():
    with pytest.raises(RuntimeError, match="calibrate"):
        ConsistencyDetector().evaluate(np.zeros(3), np.ones(3))


def test_fit_refuses_a_zero_batch_and_an_empty_dataset(task, data):
    trainer = ModalityBridgingTrainer(task, TrainerConfig(), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch_size must be ≥ 1, got 0"):
        trainer.fit(data, batch_size=0)
    with pytest.raises(ValueError, match="at least one training pair"):
        trainer.fit(PairBatch.from_dataset(task.backbone, data).subset(slice(0, 0)))


def test_fractions_with_decimals_parse():
    assert parse_value("0.5/255") == pytest.approx(0.5 / 255) and parse_value("8/255") == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="division by zero"):
        parse_value("1/0")


def test_contrast_keeps_each_channels_mean_as_imagenet_c_does():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert torch.allclose(corrupt_images(red, "contrast", 1).mean(dim=(2, 3)), torch.tensor([[1.0, 0.0, 0.0]]))
