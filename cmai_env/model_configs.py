"""CMAI's shipped architecture configs read as data, without torch (scenario validation uses it).

A config ``cmai_env/models/configs/<name>.json`` with ``"architecture": "flamingo"`` describes a
generative backbone (:mod:`cmai_env.models.flamingo`); every other config is an open_clip one.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Where the shipped configs live (``cmai_env.models.registry.configs_dir`` resolves the same folder).
CONFIGS_DIR = Path(__file__).resolve().parent / "models" / "configs"

#: Attacks with a generative version (:func:`cmai_env.models.flamingo_task.generative_attack`),
#: torch-free so that scenario validation can refuse the others.
#: Grouped by how :mod:`cmai_env.models.flamingo_task` plays them: unchanged on the generative
#: task's logits, adapted to the caption (bridges and text attacks), or the torchattacks chain.
GENERATIVE_UNCHANGED = ("fgsm", "pgd_linf", "pgd_l2", "universal")
GENERATIVE_ADAPTED = ("bridge_image_to_text", "text_embedding_pgd", "bridge_text_to_image", "token_substitution")
GENERATIVE_CHAIN = ("apgd_ce", "apgd_t", "fab_t", "square", "autoattack")
GENERATIVE_ATTACKS = GENERATIVE_UNCHANGED + GENERATIVE_ADAPTED + GENERATIVE_CHAIN


def is_generative_config(path: Path) -> bool:
    """Whether a config file describes a generative (flamingo) architecture rather than an open_clip one."""
    try:
        return json.loads(Path(path).read_text()).get("architecture") == "flamingo"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def is_generative_backbone(name: str) -> bool:
    """Whether ``name`` is one of CMAI's shipped generative architectures."""
    return is_generative_config(CONFIGS_DIR / f"{name}.json")
