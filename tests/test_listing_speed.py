"""The listing commands stay light, and the attack declarations are the attack classes' one source.

``cmai scenarios list | validate`` and ``cmai attack list`` read only
:mod:`cmai_env.attacks.specs` (torch-free declarations); each runs here in a fresh interpreter
that reports which heavy packages it imported and its peak RSS (``benchmarks/listing_speed.py``
measures the wall time). The rest checks that every attack class takes its parameters, defaults,
ranges and threat model from its declaration.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmai_env.attacks import Attack, attack_class, available_attacks, make_attack
from cmai_env.attacks.specs import DECLARATIONS, ThreatModel, _embedded_backbones, declaration
from cmai_env.scenario import ScenarioError, load_scenario

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p) for p in (ROOT / "cmai_env" / "scenarios").glob("*.yaml"))
HEAVY = ("torch", "open_clip", "torchvision", "torchattacks", "stable_baselines3", "sklearn", "transformers")

#: a user scenario using a declared attack of every kind of check (ranges, choices, transfer's inner)
USER_SCENARIO = textwrap.dedent(
    """\
    name: user
    phases:
      - name: a
        rounds: 2
        attacks:
          - {name: pgd_linf, params: {eps: 4/255, steps: 3}}
          - {name: bridge_text_to_image, params: {target: random, target_embedding: prompt}}
          - {name: transfer, params: {inner: token_substitution, k: 2}}
          - {name: autoattack, params: {components: "apgd_ce,square", norm: L2}}
    """
)


def _run_cli(args: list[str]) -> dict:
    """Run ``cmai ARGS`` in a fresh interpreter; its exit code, output, heavy imports and peak RSS."""
    code = textwrap.dedent(
        f"""\
        import contextlib, io, json, sys
        from cmai_env.cli.main import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main({args!r})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        # VmHWM, not ru_maxrss: ru_maxrss keeps the forked pytest parent's peak across exec
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        rss_mb = int(status["VmHWM"].split()[0]) / 1024
        print(json.dumps({{"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy, "rss_mb": rss_mb}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [["scenarios", "list"], ["scenarios", "validate", *SHIPPED], ["attack", "list"]],
    ids=["scenarios-list", "scenarios-validate", "attack-list"],
)
def test_listing_commands_import_no_torch(args):
    result = _run_cli(args)
    assert result["rc"] == 0, result["err"]
    assert result["heavy"] == [], f"cmai {' '.join(args[:2])} imported {result['heavy'][:5]}"
    assert result["rss_mb"] < 200, result["rss_mb"]  # importing torch alone takes ~400 MB
    assert result["out"].strip()


def test_validating_user_files_imports_no_torch_on_success_or_error(tmp_path):
    good = tmp_path / "user.yaml"
    good.write_text(USER_SCENARIO)
    bad = tmp_path / "bad.yaml"
    bad.write_text(USER_SCENARIO.replace("steps: 3", "steps: 0").replace("norm: L2", "norm: L3"))
    result = _run_cli(["scenarios", "validate", str(good), str(bad)])
    assert result["rc"] == 1 and result["heavy"] == [], result["heavy"][:5]
    assert f"OK {good} (user: 2 rounds, 1 phases)" in result["out"]
    assert "phases.0.attacks.0.params.steps" in result["err"] and "pgd_linf: steps must be a positive integer, got 0" in result["err"]
    assert "autoattack: norm must be one of ('Linf', 'L2'), got 'L3'" in result["err"]


def test_every_class_takes_its_facts_from_its_declaration():
    assert available_attacks() == sorted(DECLARATIONS)
    for name, declared in DECLARATIONS.items():
        cls = attack_class(name)
        assert cls.declaration is declared and f"{cls.__module__}:{cls.__qualname__}" == declared.entry_point
        assert cls.parameters() == declared.defaults(), name
        params = {f.name: f for f in dataclasses.fields(cls) if f.init}
        assert [params[p.name].type for p in declared.params] == [p.annotation for p in declared.params]
        assert (cls.modality, cls.description, cls.threat_model, cls.counterpart, cls.embedding) == (
            declared.modality, declared.description, declared.threat_model, declared.counterpart, declared.embedding
        ), name
        instance = make_attack(name)
        assert {key: getattr(instance, key) for key in declared.defaults()} == declared.defaults()
        if declared.embedding is not None:
            # the embedding fidelity scores the prediction the attack flips, with the parameter that sets its strength
            assert declared.embedding.budget in declared.defaults() and declared.embedding.modality == declared.modality, name
        if declared.counterpart is not None:
            assert declared.threat_model.detector_aware and not declaration(declared.counterpart).threat_model.detector_aware


def test_constructor_and_scenario_run_the_declared_checks(tmp_path):
    cases = [
        ("pgd_linf", {"steps": 0}, "pgd_linf: steps must be a positive integer, got 0"),
        ("fgsm", {"eps": -0.1}, "fgsm: eps must be ≥ 0, got -0.1"),
        ("token_substitution", {"k": -1}, "token_substitution: k must be an integer ≥ 0, got -1"),
        ("bridge_image_to_text", {"target": "farthest"}, "bridge_image_to_text: target must be one of ('nearest', 'random'), got 'farthest'"),
        ("square", {"norm": "L1"}, "square: norm must be one of ('Linf', 'L2'), got 'L1'"),
        ("universal", {"batch_size": 0}, "universal: batch_size must be a positive integer, got 0"),
        ("autoattack", {"components": "apgd_ce,apgd_ce"}, "autoattack: components must be distinct names"),
        ("transfer", {"inner": "transfer"}, "transfer: inner must be a registered attack other than 'transfer'"),
        ("transfer", {"inner": "token_substitution", "eps": 0.1}, "transfer: inner attack 'token_substitution' has no parameter 'eps'"),
        ("transfer", {"inner": "pgd_linf", "steps": 2.5}, "transfer: steps must be an integer, as the inner attack 'pgd_linf'"),
        ("transfer", {"inner": "pgd_linf", "steps": 0}, "pgd_linf: steps must be a positive integer, got 0"),
        ("transfer", {"surrogate": "no-such-net"}, "transfer: surrogate 'no-such-net' is not a backbone load_backbone knows"),
    ]
    for name, params, message in cases:
        declared = declaration(name)
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as from_class:
            make_attack(name, **params)
        with pytest.raises(ValueError) as from_declaration:
            declared.check({**declared.defaults(), **params})
        assert str(from_class.value) == str(from_declaration.value)
        file = tmp_path / f"{name}.yaml"
        file.write_text(f"phases: [{{name: a, rounds: 1, attacks: [{{name: {name}, params: {json.dumps(params)}}}]}}]\n")
        with pytest.raises(ScenarioError) as from_scenario:
            load_scenario(file)
        assert str(from_declaration.value) in str(from_scenario.value)


def test_a_class_cannot_restate_or_contradict_its_declaration():
    with pytest.raises(TypeError, match="declared in cmai_env/attacks/specs.py"):
        @dataclasses.dataclass
        class Restated(Attack):  # noqa: F841
            name = "pgd_linf"
            eps: float = 1.0

    with pytest.raises(TypeError, match="differs from the declaration"):
        @dataclasses.dataclass
        class Contradicts(Attack):  # noqa: F841
            name = "pgd_linf"
            threat_model = ThreatModel(("image",), "black-box")

    with pytest.raises(ValueError, match="unknown attack 'not_declared'"):
        class Undeclared(Attack):  # noqa: F841
            name = "not_declared"


def test_transfer_surrogate_names_match_the_backbone_registry():
    from cmai_env.models import available_backbones, embedded_backbones

    assert _embedded_backbones() == embedded_backbones()
    assert declaration("transfer").defaults()["surrogate"] in _embedded_backbones()
    assert set(_embedded_backbones()) <= set(available_backbones())
    # the threat model printed for transfer is its default inner attack's, made black-box
    inner = declaration(declaration("transfer").defaults()["inner"])
    assert declaration("transfer").threat_model == ThreatModel(inner.threat_model.controls, "black-box")
    assert make_attack("transfer", inner="token_substitution").threat_model == ThreatModel(("text",), "black-box")
