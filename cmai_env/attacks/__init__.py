"""Attacks on image–text pairs, behind one registry.

Every attack is declared, without torch, in :mod:`cmai_env.attacks.specs` (name, modality,
threat model, parameters with defaults and ranges); its class is imported on first use
(``make_attack``, ``attack_class``, or an attribute of this package):

=======================  ========  =========================================================
name                     modality  what it does
=======================  ========  =========================================================
``fgsm``                 image     one signed-gradient step, ℓ∞ ``ε_v`` (8/255)
``pgd_linf``             image     PGD-ℓ∞ on the image's zero-shot CE (8/255, 10 × 2/255)
``pgd_l2``               image     PGD-ℓ2 on the image's zero-shot CE (0.5, 10 × 0.1)
``text_embedding_pgd``   text      PGD on input token embeddings, L2 per token (0.2)
``token_substitution``   text      HotFlip-style greedy swap of up to ``k`` word tokens (1)
``bridge_image_to_text`` image     image embedding pulled onto a wrong class's text (16/255)
``bridge_text_to_image`` text      caption embedding pulled onto a wrong class's images (0.2)
``co_attack``            both      text embedding PGD, then image PGD away from both captions
``universal``            image     one fitted ℓ∞ δ added to every image (8/255)
``apgd_ce``              image     APGD on CE, 100 iterations (AutoAttack component, 8/255)
``apgd_t``               image     targeted APGD on DLR, 9 targets × 100 iterations
``fab_t``                image     targeted FAB, 9 targets × 100 iterations
``square``               image     Square Attack, black-box, 5,000 queries
``autoattack``           image     APGD-CE → APGD-T → FAB-T → Square, worst case per example
``aware_pgd_linf``       image     detector-aware image PGD: min(margin, κ) − λ·L_consistency
``aware_caption_rewrite`` image    detector-aware: caption rewritten to c*, image PGD ↓ L_consistency
``transfer``             inner's   black-box: ``inner`` crafted on a ``surrogate`` backbone, sent to the target
=======================  ========  =========================================================

Each attack states its threat model (``Attack.threat_model``: the modalities the attacker
controls, white- or black-box, detector-aware or not); ``modality`` is the prediction it flips.

    from cmai_env.attacks import PairBatch, ZeroShotTask, make_attack
    attack = make_attack("pgd_linf", eps=4 / 255)
    adv = attack(task, batch, torch.Generator().manual_seed(0)).batch

``cmai attack list`` prints the parameters and defaults; :mod:`cmai_env.robustness` measures
an attack's ASR and how well the consistency detector sees it.
"""

import importlib
from typing import Any

# Light, torch-free: what each attack is (scenario validation and `cmai attack list` need only this).
from cmai_env.attacks.specs import EmbeddingCounterpart, Modality, ThreatModel, available_attacks, declaration

#: public name → the module defining it; imported on first access (PEP 562), so that importing
#: ``cmai_env.attacks`` (or ``cmai_env.attacks.specs``) does not import torch.
_LAZY = {
    **dict.fromkeys(
        ("Attack", "AttackResult", "PairBatch", "TaskOutputs", "ZeroShotTask", "attack_class", "attack_success_rate",
         "frozen_model", "make_attack", "register_attack", "task_loss"),
        "cmai_env.attacks.base",
    ),
    **dict.fromkeys(("FGSM", "PGDL2", "PGDLinf", "pgd_l2_ascent", "pgd_linf_ascent"), "cmai_env.attacks.image"),
    **dict.fromkeys(("TextEmbeddingPGD", "TokenSubstitution", "pgd_token_ascent", "token_masks"), "cmai_env.attacks.text"),
    **dict.fromkeys(("BridgeImageToText", "BridgeTextToImage"), "cmai_env.attacks.bridge"),
    "CoAttack": "cmai_env.attacks.joint",
    "Universal": "cmai_env.attacks.universal",
    "Transfer": "cmai_env.attacks.transfer",
    **dict.fromkeys(("APGDCE", "APGDT", "FABT", "AutoAttack", "Square"), "cmai_env.attacks.autoattack"),
    **dict.fromkeys(("AwareCaptionRewrite", "AwarePGDLinf"), "cmai_env.attacks.adaptive"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "APGDCE",
    "APGDT",
    "Attack",
    "AutoAttack",
    "AwareCaptionRewrite",
    "AwarePGDLinf",
    "FABT",
    "Square",
    "ThreatModel",
    "AttackResult",
    "BridgeImageToText",
    "BridgeTextToImage",
    "CoAttack",
    "FGSM",
    "Modality",
    "PGDL2",
    "PGDLinf",
    "PairBatch",
    "TaskOutputs",
    "TextEmbeddingPGD",
    "TokenSubstitution",
    "Transfer",
    "Universal",
    "ZeroShotTask",
    "EmbeddingCounterpart",
    "attack_class",
    "attack_success_rate",
    "available_attacks",
    "declaration",
    "frozen_model",
    "make_attack",
    "pgd_l2_ascent",
    "pgd_linf_ascent",
    "pgd_token_ascent",
    "register_attack",
    "task_loss",
    "token_masks",
]
