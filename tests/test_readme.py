"""The README is executable: every command in its ``bash`` blocks and every ``python`` block runs.

Commands run in order, as a newcomer types them, in one fresh folder (so ``cmai evaluate`` finds
the run that the ``cmai train`` line above it wrote), with ``.venv/bin`` first on ``PATH``. The
only change is one documented substitution: budget flags are shrunk to tiny values
(:data:`SHRINK`: ``--timesteps 20000`` → ``--timesteps 64``, ``--seeds 0 1 2 3 4`` → ``--seeds 0``,
…; ``rl_zoo3.train`` also gets ``--hyperparams n_steps:64 batch_size:64``, its rollout length); ``make run`` gets the same through ``QUICKSTART_ARGS``. Three lines are special:

* ``make test`` is this test suite itself (CI runs it); it is not run from inside it;
* ``tensorboard --logdir ...`` is a server: it passes when it starts serving, then it is stopped;
* the ``yaml`` block of "Writing a scenario" is saved as ``my_scenario.yaml``, the file the next
  block validates.

A command fails the test when it exits non-zero or prints a Python traceback.

The README's long, self-contained commands (:data:`SELF_CONTAINED`: ``cmai tune``, ``cmai sweep``,
``cmai adv-train``, which read nothing another step wrote and write an ``--out`` folder no other
step reads) run in ``tests/test_readme_self_contained.py``, in a fresh folder of their own, so that
``make test``'s second worker takes them while the first runs the rest here in order. Every step
runs in exactly one of the two files (:func:`test_every_step_runs_in_exactly_one_file`).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Budget flags and the tiny value each is shrunk to (the value replaces every value the flag had).
SHRINK: dict[str, list[str]] = {
    "--timesteps": ["64"],
    "--seeds": ["0"],
    "--episodes": ["1"],
    "--trials": ["2"],
    "--budget-minutes": ["0.05"],
    "--steps": ["2"],
    "--n": ["64"],
    "--eval-n": ["64"],
    "--train-n": ["128"],
    "-n": ["64"],
}
#: ``make run`` with the same shrinking (``cmai quickstart``'s budget flags).
QUICKSTART_ARGS = "--timesteps 64 --seeds 0 --n-envs 4"
SCENARIO_FILE = "my_scenario.yaml"
#: Wall-clock limit of one command (seconds).
COMMAND_TIMEOUT = 600

pytestmark = [pytest.mark.slow, pytest.mark.ci_slow]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, flags=re.S | re.M)]


def commands(body: str) -> list[str]:
    """The command lines of a bash block (comments and blank lines dropped, ``\\`` continuations joined)."""
    out: list[str] = []
    for line in body.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            out.append(shlex.join(tokens))
    return out


def shrink(command: str) -> str:
    """Apply :data:`SHRINK` to the budget flags present in ``command`` (nothing else changes)."""
    tokens = shlex.split(command)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        out.append(token)
        i += 1
        if token in SHRINK:
            while i < len(tokens) and not (tokens[i].startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", tokens[i])):
                i += 1
            out.extend(SHRINK[token])
    if out[:3] == ["python", "-m", "rl_zoo3.train"] and "--hyperparams" not in out:
        # rl-zoo3 collects one whole PPO rollout (n_steps = 2048 by default) whatever -n says:
        # the rollout length is a budget too.
        out += ["--hyperparams", "n_steps:64", "batch_size:64"]
    return shlex.join(out)


def readme_steps() -> list[tuple[str, str]]:
    """``(kind, text)`` steps: ``bash`` commands, ``python`` snippets and the scenario ``yaml`` to save."""
    steps: list[tuple[str, str]] = []
    for language, body in code_blocks(README.read_text(encoding="utf-8")):
        if language == "bash":
            steps += [("bash", command) for command in commands(body)]
        elif language == "python":
            steps.append(("python", body))
        elif language == "yaml":
            steps.append(("yaml", body))
    return steps


STEPS = readme_steps()
#: Command prefixes of the steps that run in ``test_readme_self_contained.py`` (module docstring).
SELF_CONTAINED = ("cmai tune ", "cmai sweep ", "cmai adv-train ")


def is_self_contained(step: tuple[str, str]) -> bool:
    """Whether ``step`` is one of :data:`SELF_CONTAINED`'s commands."""
    kind, text = step
    return kind == "bash" and text.startswith(SELF_CONTAINED)


#: The steps this file runs, in README order.
CHAIN = [step for step in STEPS if not is_self_contained(step)]


def _step_id(step: tuple[str, str]) -> str:
    kind, text = step
    return f"{kind}: {text.strip().splitlines()[0][:70]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "CMAI_CACHE_DIR": "cmai-cache",
    }


def _check(result: subprocess.CompletedProcess, shown: str) -> None:
    output = (result.stdout or "") + (result.stderr or "")
    assert result.returncode == 0, f"`{shown}` exited {result.returncode}:\n{output[-4000:]}"
    assert "Traceback (most recent call last)" not in output, f"`{shown}` printed a traceback:\n{output[-4000:]}"


def _serve_briefly(command: str, cwd: Path) -> None:
    """Start a server command, pass once it says where it serves, then stop it."""
    process = subprocess.Popen(shlex.split(command), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            seen += line
            if "http://" in line:
                return
        pytest.fail(f"`{command}` did not start serving:\n{seen[-3000:]}")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_readme_has_commands_and_snippets():
    kinds = [kind for kind, _ in STEPS]
    assert kinds.count("bash") >= 15 and kinds.count("python") >= 2 and kinds.count("yaml") == 1
    assert any(text.startswith("cmai train") and "--tensorboard" in text for kind, text in STEPS if kind == "bash")


def test_shrink_only_touches_budget_flags():
    assert shrink("cmai evaluate --policy p --seeds 0 1 2 3 4 --out o") == "cmai evaluate --policy p --seeds 0 --out o"
    assert shrink("cmai train --timesteps 20000 --seed 0") == "cmai train --timesteps 64 --seed 0"
    assert shrink("cmai attack eval --eps 8/255 --steps 10 --json") == "cmai attack eval --eps 8/255 --steps 2 --json"
    assert shrink("cmai scenarios list") == "cmai scenarios list"


def test_every_step_runs_in_exactly_one_file():
    alone = [step for step in STEPS if is_self_contained(step)]
    assert len(alone) == len(SELF_CONTAINED) and len(alone) + len(CHAIN) == len(STEPS)
    for kind, text in alone:
        argv = shlex.split(text)
        out = argv[argv.index("--out") + 1]
        # no other step reads (or writes) the folder a self-contained step writes
        assert not [other for _, other in STEPS if other != text and out in other], out


@pytest.mark.parametrize("step", CHAIN, ids=[_step_id(s) for s in CHAIN])
def test_readme_step_runs(step, workdir):
    run_step(step, workdir)


def run_step(step: tuple[str, str], workdir: Path) -> None:
    """Run one README step in ``workdir`` (module docstring: what is substituted, what fails)."""
    kind, text = step
    if kind == "yaml":
        (workdir / SCENARIO_FILE).write_text(text)
        return
    if kind == "python":
        result = subprocess.run([sys.executable, "-c", text], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        _check(result, text.strip().splitlines()[0] + " …")
        return
    if text == "make test":
        pytest.skip("`make test` is this test suite; CI runs it")
    if text.startswith("tensorboard "):
        _serve_briefly(text, workdir)
        return
    if text == "make run":
        argv = ["make", "-f", str(REPO / "Makefile"), "run", f"QUICKSTART_ARGS={QUICKSTART_ARGS}"]
        shown = f"make run QUICKSTART_ARGS='{QUICKSTART_ARGS}'"
    else:
        argv = shlex.split(shrink(text))
        shown = shlex.join(argv)
    result = subprocess.run(argv, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    _check(result, shown)


def test_cmai_train_with_two_envs_at_default_verbosity(workdir):
    """`--n-envs 2` at the default verbosity (SB3's console table printed) writes a loadable run."""
    out = workdir / "n-envs"
    result = subprocess.run(
        ["cmai", "train", "--algo", "ppo", "--scenario", "quickstart", "--timesteps", "64", "--n-envs", "2", "--out", str(out),
         "--tensorboard", str(out / "tb")],
        cwd=workdir, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )
    _check(result, "cmai train --n-envs 2")
    assert "run folder: " in result.stdout and "total_timesteps" in result.stdout
    run_dir = Path(result.stdout.split("run folder: ")[1].split()[0])
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    assert (run_dir / "quickstart.zip").is_file() and (run_dir / "run.json").is_file()
