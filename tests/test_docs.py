"""The README's links into the repository resolve, and the files it sends readers to say what they hold."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: ``[text](target)`` with a target that is not a URL or an in-page anchor.
LOCAL_LINK = re.compile(r"\]\((?!https?://|#)([^)\s#]+)")


def test_readme_links_into_the_repository_resolve():
    targets = LOCAL_LINK.findall((REPO / "README.md").read_text())
    assert "docs/measurements.md" in targets  # the measurement log the results point to
    missing = [target for target in targets if not (REPO / target).is_file()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_measurement_log_has_its_results_and_limits():
    log = (REPO / "docs" / "measurements.md").read_text()
    assert log.startswith("# Measurement log")
    assert "## Results, in full" in log and "## Known limits, with their measurements" in log
    # every results row names the command that printed it
    rows = [line for line in log.splitlines() if line.startswith("| ") and not line.startswith("| command")]
    assert rows and all("`" in row.split(" | ")[0] for row in rows)
