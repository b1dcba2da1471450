"""Shared test settings.

Torch defaults to one intra-op thread per core; on the 2-core CI machine, with pytest and
subprocess workers competing, that oversubscribes the CPU and made small-batch steps ~30x
slower. The tests use tiny batches, where one thread is also the fastest setting.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
#: The suite's own cache root (reference-cache JSON, ``pixel_travel`` radii), one per test process
#: and removed when it exits: the tests neither read files a user's runs left in ``~/.cache/cmai``
#: nor leave theirs there. Commands the tests start inherit it; tests that check the caches
#: themselves set a folder of their own.
_CACHE_ROOT = tempfile.TemporaryDirectory(prefix="cmai-test-cache-")
os.environ["CMAI_CACHE_DIR"] = _CACHE_ROOT.name


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """``$CMAI_CACHE_DIR`` in this test's own folder: what it caches is computed here, not read from
    another test. Returns the ``pixel_travel`` tables' folder in it."""
    monkeypatch.setenv("CMAI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "travel"


@pytest.fixture(scope="module")
def backbone():
    """The embedded ``cmai-tiny`` in eval mode, one per test module (attack tests share it)."""
    from cmai_env.models import load_backbone

    model = load_backbone()
    model.eval()
    return model


@pytest.fixture(scope="module")
def task(backbone, data):
    """The zero-shot task over the module's own ``data`` fixture (each attack test file sizes its data)."""
    from cmai_env.attacks import ZeroShotTask

    return ZeroShotTask.from_dataset(backbone, data)


@pytest.fixture(scope="module")
def batch(backbone, data):
    """The module's ``data`` as a :class:`PairBatch` of the backbone."""
    from cmai_env.attacks import PairBatch

    return PairBatch.from_dataset(backbone, data)


#: Test files that take longest (the README test: about ten minutes; its self-contained commands,
#: about four), collected first, so that with ``make test``'s parallel workers (``--dist loadfile``
#: hands out files in collection order) they start at once instead of after the short files.
LONGEST_FIRST = ("test_readme.py", "test_readme_self_contained.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put :data:`LONGEST_FIRST` files first; skip ``slow`` tests unless ``CMAI_SLOW=1`` (``ci_slow`` ones always run)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within files kept
    if os.environ.get("CMAI_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow end-to-end test: set CMAI_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords and "ci_slow" not in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def interrupt_training(monkeypatch):
    """``stop = interrupt_training(40)``: training runs then raise Ctrl-C at 40 steps; ``stop()`` ends that."""
    import agents.train as train_module
    from stable_baselines3.common.callbacks import BaseCallback

    original = train_module._callbacks

    def install(at_steps: int):
        class CtrlC(BaseCallback):
            def _on_step(self) -> bool:
                if self.num_timesteps >= at_steps:
                    raise KeyboardInterrupt
                return True

        monkeypatch.setattr(train_module, "_callbacks", lambda *a, **k: [*original(*a, **k), CtrlC()])
        return lambda: monkeypatch.setattr(train_module, "_callbacks", original)

    return install
