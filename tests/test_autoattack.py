"""AutoAttack-grade attacks: standard counts, real class count, worst case per example, no global RNG, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cmai_env.attacks import attack_class, make_attack
from cmai_env.attacks.autoattack import COMPONENTS, _apgd_t, _fab_t
from cmai_env.cli.main import main as cmai
from cmai_env.data import load_dataset
from cmai_env.models import ZeroShotClassifier
from cmai_env.robustness import evaluate_attack

pytest.importorskip("torchattacks")

# Few iterations / queries so the file stays fast; the standard counts are the defaults (tested below).
SMALL = {"steps": 5, "n_target_classes": 2, "n_queries": 60}


@pytest.fixture(scope="module")
def data(backbone):
    return load_dataset("shapes", split="test", n=48, seed=2, image_size=backbone.image_size)


def _asr(task, batch, attack, seed=0):
    return evaluate_attack(task, batch, attack, torch.Generator().manual_seed(seed), batch_size=64).asr


def test_defaults_are_autoattack_standard_counts_and_threat_models():
    chain = make_attack("autoattack")
    assert chain.chain == list(COMPONENTS) == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert (chain.eps, chain.steps, chain.n_target_classes, chain.n_queries) == (pytest.approx(8 / 255), 100, 9, 5000)
    assert make_attack("apgd_ce").steps == 100 and make_attack("apgd_t").n_target_classes == 9
    assert make_attack("square").n_queries == 5000
    for name in ("apgd_ce", "apgd_t", "fab_t", "autoattack"):
        model = attack_class(name).threat_model
        assert model.controls == ("image",) and model.knowledge == "white-box" and not model.detector_aware
    assert attack_class("square").threat_model.knowledge == "black-box"
    # a sub-chain runs in the standard order whatever order it is written in
    assert make_attack("autoattack", components="apgd_t, apgd_ce").chain == ["apgd_ce", "apgd_t"]
    with pytest.raises(ValueError, match="components"):
        make_attack("autoattack", components="apgd_ce,pgd")
    with pytest.raises(ValueError, match="norm"):
        make_attack("apgd_ce", norm="L1")
    with pytest.raises(ValueError, match="n_target_classes"):
        make_attack("apgd_t", n_target_classes=0)


def test_targets_come_from_the_real_number_of_classes(backbone, task):
    """torchattacks derives n_target_classes from n_classes=10; we cap the standard 9 at C − 1."""
    model = ZeroShotClassifier(backbone, task.class_embeds)
    assert task.num_classes == 30
    assert _apgd_t(8 / 255, "Linf", 5, 1, 9)(model, task.num_classes, 0).n_target_classes == 9
    assert _apgd_t(8 / 255, "Linf", 5, 1, 9)(model, 5, 0).n_target_classes == 4
    assert _fab_t(8 / 255, "Linf", 5, 1, 9)(model, 30, 0).n_target_classes == 9


def test_chain_respects_budget_and_is_worst_case_per_example(task, batch):
    eps = 2 / 255
    chain = make_attack("autoattack", eps=eps, **SMALL)
    adv = chain(task, batch, torch.Generator().manual_seed(0)).batch
    assert adv.images.min() >= 0 and adv.images.max() <= 1
    assert (adv.images - batch.images).abs().max() <= eps + 1e-6
    assert torch.equal(adv.tokens, batch.tokens) and adv.token_embeds is None
    with torch.no_grad():
        clean_ok = task.image_logits(batch.images).argmax(-1) == batch.labels
        adv_ok = task.image_logits(adv.images).argmax(-1) == batch.labels
        first = make_attack("apgd_ce", eps=eps, steps=SMALL["steps"])(task, batch, torch.Generator().manual_seed(0)).batch
        first_ok = task.image_logits(first.images).argmax(-1) == batch.labels
    flipped = clean_ok & ~adv_ok
    assert int(flipped.sum()) == sum(chain.broken_by.values())  # each flip is counted once, by the component that made it
    # the chain's first component is APGD-CE with the same seed: every example it flips stays flipped
    assert not (clean_ok & ~first_ok & adv_ok).any()
    assert chain.broken_by["apgd_ce"] == int((clean_ok & ~first_ok).sum())
    # the later components find flips APGD-CE missed
    assert flipped.sum() > (clean_ok & ~first_ok).sum()


def test_global_rng_untouched_and_seeded_generator_reproduces(task, batch):
    small = batch.subset(slice(0, 16))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    attack = make_attack("autoattack", eps=2 / 255, **SMALL)
    first = attack(task, small, torch.Generator().manual_seed(5)).batch.images
    assert torch.equal(torch.get_rng_state(), state), "torchattacks reseeded the global generator"
    second = make_attack("autoattack", eps=2 / 255, **SMALL)(task, small, torch.Generator().manual_seed(5)).batch.images
    assert torch.equal(first, second)
    square = make_attack("square", eps=8 / 255, n_queries=40)
    a = square(task, small, torch.Generator().manual_seed(1)).batch.images
    b = square(task, small, torch.Generator().manual_seed(2)).batch.images
    assert not torch.equal(a, b), "the generator does not drive Square's random search"
    assert not torch.equal(a, small.images)  # it did flip some (unflipped examples come back clean)


def test_apgd_is_at_least_as_strong_as_pgd_and_shows_no_gradient_masking(task, batch):
    """APGD-CE ≥ PGD-10 at the same ε; ASR grows with ε; black-box Square stays below white-box."""
    batch = batch.subset(slice(0, 32))
    pgd = _asr(task, batch, make_attack("pgd_linf", eps=1 / 255, steps=10, step_size=0.25 / 255))
    by_eps = [_asr(task, batch, make_attack("apgd_ce", eps=e / 255, steps=10)) for e in (0.5, 1, 2, 16)]
    assert 0.05 < by_eps[1] < 0.98, f"APGD-CE at 1/255 saturated ({by_eps[1]:.3f}): the check says nothing"
    assert by_eps[1] >= pgd - 0.03, f"APGD-CE {by_eps[1]:.3f} vs PGD-10 {pgd:.3f}"
    assert by_eps == sorted(by_eps) and by_eps[-1] == 1.0, by_eps
    square = _asr(task, batch, make_attack("square", eps=1 / 255, n_queries=100))
    assert square <= by_eps[1] + 1e-9, f"black-box {square:.3f} above white-box {by_eps[1]:.3f}: gradient masking?"


def test_cli_attack_eval_autoattack_reports_components(capsys):
    args = ["attack", "eval", "--attack", "autoattack", "--eps", "2/255", "--steps", "3", "--n", "16", "--json"]
    args += ["--param", "n_target_classes=2", "--param", "n_queries=20", "--param", "components=apgd_ce,apgd_t,square"]
    assert cmai(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["broken_by"]) == {"apgd_ce", "apgd_t", "square"}
    n_correct = round(result["clean_accuracy"] * result["n"])
    assert sum(result["broken_by"].values()) == round(result["asr"] * n_correct)
    assert result["threat_model"] == {"controls": ["image"], "knowledge": "white-box", "detector_aware": False}
    assert "counterpart" not in result


@pytest.mark.slow  # two standard-count APGD-CE → APGD-T evaluations: ~20 s on an idle core, more on a busy one
def test_adv_train_reports_the_autoattack_grade_figure_beside_pgd(tmp_path, capsys):
    out = tmp_path / "adv"
    args = ["adv-train", "--budget-minutes", "0.01", "--train-n", "64", "--eval-n", "8", "--threads", "1"]
    args += ["--robust-eval", "apgd", "--out", str(out), "--json"]
    assert cmai(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["robust_eval"] == "apgd"
    assert report["eval_attacks"]["autoattack"]["components"] == "apgd_ce,apgd_t"
    for when in ("before", "after"):
        aa = report[when]["autoattack"]
        assert set(aa["broken_by"]) == {"apgd_ce", "apgd_t"} and aa["cpu_seconds"] > 0
        assert 0.0 <= aa["asr"] <= 1.0 and "pgd_linf" in report[when]
    assert "autoattack" in report["change"]


def test_adv_train_defaults_to_the_apgd_core_and_can_run_the_full_chain_or_skip_it():
    import argparse

    from cmai_env.cli import adv_train

    parser = argparse.ArgumentParser()
    adv_train.register(parser.add_subparsers())
    assert parser.parse_args(["adv-train"]).robust_eval == "apgd"
    assert adv_train.ROBUST_EVALS["apgd"][1]["components"] == "apgd_ce,apgd_t"
    assert parser.parse_args(["adv-train", "--robust-eval", "autoattack"]).robust_eval == "autoattack"
    assert parser.parse_args(["adv-train", "--robust-eval", "none"]).robust_eval == "none"
    assert adv_train.ROBUST_EVALS["autoattack"][1] == {"eps": 8 / 255}  # standard counts: the attack's defaults
