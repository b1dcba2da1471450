"""The distribution: LICENSE matches pyproject, and `python -m build` makes a wheel that carries
everything a non-editable install needs (weights, configs, scenarios, hyperparameters, every module).

The wheel is built from a copy of the sources (so the repository gets no build/ or egg-info
from the test) with ``--no-isolation``: the virtual environment's own setuptools, offline.
The fresh-virtual-environment check (slow) installs that wheel with ``pip install --no-deps``
into a venv made without system site-packages, lends it this environment's dependencies
through a ``.pth`` file (installing torch afresh takes minutes), and runs the installed
``cmai backbone eval --json`` on the embedded weights from outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cmai_env", "agents")
#: data files a non-editable install must carry (globs relative to the repository root)
DATA = ("cmai_env/models/weights/*.pt", "cmai_env/models/weights/*.json", "cmai_env/models/configs/*.json",
        "cmai_env/scenarios/*.yaml", "agents/hyperparams/*.yml")


def test_license_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    license_text = (REPO / "LICENSE").read_text()
    assert project["license"] == "MIT" and license_text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in license_text


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "build", "dist", "*.egg-info")
    for folder in PACKAGES:
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    for file in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / file, src / file)
    run = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (built,) = (tmp / "dist").glob("cmai-*.whl")
    return built


def test_wheel_carries_data_modules_license_and_entry_point(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    data = {str(p.relative_to(REPO)) for pattern in DATA for p in REPO.glob(pattern)}
    assert {"cmai_env/models/weights/cmai-tiny.pt", "cmai_env/models/weights/cmai-tiny-rn.pt",
            "cmai_env/models/configs/cmai-tiny-rn.json", "cmai_env/scenarios/quickstart.yaml",
            "agents/hyperparams/ppo.yml"} <= data
    assert not data - names, f"data files missing from the wheel: {sorted(data - names)}"
    modules = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert not modules - names, f"modules missing from the wheel (undeclared packages?): {sorted(modules - names)}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert "License-Expression: MIT" in metadata and license_text == (REPO / "LICENSE").read_text()
    assert "cmai = cmai_env.cli.main:main" in entry_points


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs_backbone_eval(wheel, tmp_path):
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    # Dependencies (torch, open_clip, ...) from this environment, *after* the fresh site-packages:
    # a path added by a .pth file is not a site directory, so the editable install's own .pth there
    # (which would put the repository on sys.path) is never processed.
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "zz_cmai_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    where = subprocess.run([str(python), "-c", "import cmai_env; print(cmai_env.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(fresh_site)), where.stdout + where.stderr
    for backbone in ("cmai-tiny", "cmai-tiny-rn"):
        run = subprocess.run([str(env_dir / "bin" / "cmai"), "backbone", "eval", "--backbone", backbone, "--n", "300", "--json"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["pretrained"].startswith(str(fresh_site)) and result["zero_shot_accuracy"] >= 0.95
