"""The README's long, self-contained commands (``tests/test_readme.py``'s ``SELF_CONTAINED``).

They run here, in a fresh folder of their own and in README order, with the same substitutions
as every other README step, so that ``make test``'s two workers share the README's wall time.
"""

from __future__ import annotations

import pytest

from test_readme import STEPS, _step_id, is_self_contained, run_step

pytestmark = [pytest.mark.slow, pytest.mark.ci_slow]

ALONE = [step for step in STEPS if is_self_contained(step)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme-self-contained")


@pytest.mark.parametrize("step", ALONE, ids=[_step_id(s) for s in ALONE])
def test_readme_step_runs(step, workdir):
    run_step(step, workdir)
