"""Natural distribution shift phases (ImageNet-C corruptions) at both fidelities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmai_env.corruptions import CORRUPTIONS, corrupt_images
from cmai_env.env import CMAIEnv, action_from_betas
from cmai_env.scenario import ScenarioError, validate_scenario

TASK_ONLY = action_from_betas(np.array([1.0, 0.0, 0.0]))


def test_corruptions_are_imagenet_c_seeded_and_clipped():
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = corrupt_images(images, "gaussian_noise", 3, seed=5)
    assert torch.equal(noisy, corrupt_images(images, "gaussian_noise", 3, seed=5))  # a fixed corrupted copy
    assert not torch.equal(noisy, corrupt_images(images, "gaussian_noise", 3, seed=6))
    assert noisy.min() >= 0 and noisy.max() <= 1
    deviation = [float((corrupt_images(images, "gaussian_noise", s, 0) - images).abs().mean()) for s in range(1, 6)]
    assert deviation == sorted(deviation) and deviation[0] > 0.03
    low = corrupt_images(images, "contrast", 5)
    per_image_std = lambda x: x.flatten(2).std(2)  # noqa: E731  (per image and channel: ImageNet-C's per-channel means)
    assert torch.allclose(per_image_std(low), CORRUPTIONS["contrast"][4] * per_image_std(images), atol=1e-5)
    with pytest.raises(ValueError, match="available: gaussian_noise, contrast"):
        corrupt_images(images, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt_images(images, "contrast", 6)


def test_scenario_errors_name_the_corruption_field():
    base = {"name": "t", "phases": [{"name": "a", "rounds": 2, "attacks": [], "corruption": {"name": "fog"}}]}
    with pytest.raises(ScenarioError, match=r"phases\.0\.corruption\.name.*'fog'.*gaussian_noise"):
        validate_scenario(base)
    base["phases"][0]["corruption"] = {"name": "contrast", "severity": 0}
    with pytest.raises(ScenarioError, match=r"phases\.0\.corruption\.severity"):
        validate_scenario(base)


SCENARIO = {
    "name": "shift_test",
    "batch_size": 16,
    "dataset": {"train_n": 96, "probe_n": 64},
    "phases": [
        {"name": "clean", "rounds": 1, "attacks": []},
        {"name": "noisy", "rounds": 1, "attacks": [], "corruption": {"name": "gaussian_noise", "severity": 5}},
        {"name": "back", "rounds": 1, "attacks": []},
    ],
}


@pytest.mark.parametrize("fidelity", ["embedding", "pixel"])
def test_a_corrupted_phase_lowers_clean_accuracy_and_both_fidelities_agree(fidelity):
    env = CMAIEnv(scenario=validate_scenario({**SCENARIO, "fidelity": fidelity}))
    env.reset(seed=0)
    infos = [env.step(TASK_ONLY)[4] for _ in range(3)]
    assert [i["phase"] for i in infos] == ["clean", "noisy", "back"]
    clean, noisy, back = (i["clean_acc"] for i in infos)
    assert clean >= 0.9 and back >= 0.9 and noisy <= clean - 0.4, (clean, noisy, back)
    # The fidelities corrupt the same images with the same seeds: 12/64 probe images survive σ = 0.38.
    assert noisy == pytest.approx(0.1875, abs=0.05)
