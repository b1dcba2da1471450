"""Backbones: open_clip CLIP models behind one wrapper, including the embedded ``cmai-tiny``."""

from cmai_env.models.backbone import Backbone, HiddenStates, ZeroShotClassifier
from cmai_env.models.registry import (
    available_backbones,
    checkpoint_info,
    embedded_backbones,
    load_backbone,
    read_state_dict,
)

__all__ = [
    "Backbone",
    "HiddenStates",
    "ZeroShotClassifier",
    "available_backbones",
    "checkpoint_info",
    "embedded_backbones",
    "load_backbone",
    "read_state_dict",
]
