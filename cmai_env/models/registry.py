"""Backbone factory: a name, a config file, one loader (the open_clip way).

CMAI's own architectures are open_clip model configs in ``configs/*.json``; they are added to
open_clip's config registry so that ``open_clip.create_model_and_transforms`` builds them like
any built-in model. Embedded checkpoints live in ``weights/<name>.pt`` with provenance in
``weights/<name>.json`` (command, seed, achieved accuracy).
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

import open_clip
import torch
from torchvision.transforms import Compose, Normalize

from cmai_env.models.backbone import ADAPTER_PREFIX, Backbone

_PACKAGE = "cmai_env.models"
logger = logging.getLogger(__name__)


def _package_dir(sub: str) -> Path:
    return Path(str(resources.files(_PACKAGE).joinpath(sub)))


def configs_dir() -> Path:
    return _package_dir("configs")


def weights_dir() -> Path:
    return _package_dir("weights")


def embedded_backbones() -> list[str]:
    """Names of CMAI's own architectures (configs shipped in this package)."""
    return sorted(p.stem for p in configs_dir().glob("*.json"))


def generative_backbones() -> list[str]:
    """CMAI's generative architectures (configs with ``"architecture": "flamingo"``, see ``flamingo.py``)."""
    from cmai_env.model_configs import is_generative_config

    return sorted(p.stem for p in configs_dir().glob("*.json") if is_generative_config(p))


def _ensure_registered() -> None:
    # open_clip keeps one module-level config registry; adding our folder is idempotent
    # because it rescans by file stem. Generative configs are not open_clip configs.
    if not set(embedded_backbones()) - set(generative_backbones()) <= set(open_clip.list_models()):
        open_clip.add_model_config(configs_dir())


def available_backbones() -> list[str]:
    """Every architecture name `load_backbone` accepts: CMAI's own first, then open_clip's."""
    _ensure_registered()
    own = embedded_backbones()
    return own + [m for m in open_clip.list_models() if m not in own]


def embedded_checkpoint(name: str) -> Path | None:
    path = weights_dir() / f"{name}.pt"
    return path if path.is_file() else None


def checkpoint_info(name: str) -> dict:
    """Provenance recorded beside an embedded checkpoint (command, seed, accuracy), or {}."""
    path = weights_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(pretrained).exists()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's state dict safely (``weights_only=True``: no pickled code runs).

    Accepts a bare state dict, ``{"state_dict": ...}`` (open_clip training checkpoints) and
    DistributedDataParallel ``module.`` prefixes.
    """
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory; pass the checkpoint file inside it (a .pt/.pth state dict)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes); expected a torch state dict saved with torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"could not read checkpoint {path}: {reason}. Expected a torch state dict saved with torch.save "
            "(only tensors and plain containers are accepted)."
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors (got {type(obj).__name__})")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ValueError(
            f"checkpoint {path} has NaN or infinite values in {len(broken)} tensor(s) ({', '.join(broken[:3])}"
            f"{', …' if len(broken) > 3 else ''}); it cannot be used as weights"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(name: str = "cmai-tiny", pretrained: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build a :class:`Backbone` from an architecture name and a weight source.

    :param name: an open_clip architecture (``ViT-B-32``, …) or a CMAI one (``cmai-tiny``).
        See :func:`available_backbones`.
    :param pretrained: where the weights come from:

        * ``None``: the embedded checkpoint if the name ships one, else random initialisation;
        * ``"random"``: random initialisation;
        * a file path: a state dict loaded with ``torch.load(..., weights_only=True)``;
        * an open_clip pretrained tag (``laion2b_s34b_b79k``, …): resolved by open_clip from its
          cache or the hub (set ``HF_HUB_OFFLINE=1`` and pre-fill the cache on offline machines).
    :param device: ``"cpu"`` or ``"cuda"`` (or a ``torch.device``).
    """
    _ensure_registered()
    if name in generative_backbones():
        from cmai_env.models.flamingo import load_flamingo

        return load_flamingo(name, configs_dir() / f"{name}.json", pretrained, device, weights_dir())
    known = available_backbones()
    if name not in known:
        raise ValueError(
            f"unknown backbone {name!r}. CMAI backbones: {embedded_backbones()}; "
            f"open_clip architectures: {', '.join(known[len(embedded_backbones()):])}"
        )

    source: str | None
    weights_path: Path | None = None
    tag: str | None = None
    if pretrained is None:
        weights_path = embedded_checkpoint(name)
        source = str(weights_path) if weights_path else None
    elif pretrained == "random":
        source = None
    elif _looks_like_path(pretrained):
        weights_path = Path(pretrained).expanduser()
        if weights_path.is_dir():
            raise IsADirectoryError(f"pretrained checkpoint {weights_path} is a directory; pass the .pt state dict file inside it")
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"pretrained checkpoint {weights_path} does not exist; pass an existing .pt file, "
                f"an open_clip tag ({open_clip.list_pretrained_tags_by_model(name) or 'none for ' + name}), "
                "'random', or nothing for the embedded default"
            )
        source = str(weights_path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for {name}; open_clip knows: {tags or 'no tags'}; "
                "a local file path also works"
            )
        tag = source = pretrained

    try:
        # open_clip warns "initialized randomly" whenever no tag is given, even when CMAI loads a
        # checkpoint right after; silence that one misleading warning for the duration of the call.
        logging.disable(logging.WARNING if weights_path is not None else logging.NOTSET)
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device="cpu")
    except Exception as exc:
        if tag is None:
            raise
        raise RuntimeError(
            f"open_clip could not load {name} with pretrained={tag!r} ({exc}). Offline machines need the "
            "weights in open_clip's cache or a local checkpoint path."
        ) from exc
    finally:
        logging.disable(logging.NOTSET)

    adapter_state: dict[str, torch.Tensor] = {}
    if weights_path is not None:
        state = read_state_dict(weights_path)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        # Adversarially fine-tuned checkpoints (``cmai adv-train``) may carry residual adapters under
        # their own keys; they are rebuilt on the Backbone below, not loaded into open_clip.
        adapter_state = {k: state.pop(k) for k in [k for k in state if k.startswith(ADAPTER_PREFIX)]}
        expected = clip.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [f"{k} {tuple(v.shape)}≠{tuple(expected[k].shape)}" for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"checkpoint {weights_path} does not fit architecture {name}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}"
            )
        clip.load_state_dict(state)

    # open_clip's transform ends with Normalize; CMAI keeps pixels in [0, 1] (attacks clamp there)
    # and normalises inside Backbone.encode_image, so the public preprocessing stops before it.
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    pixel_steps = []
    for step in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(step, Normalize):
            mean, std = step.mean, step.std
        else:
            pixel_steps.append(step)
    clip.eval()
    backbone = Backbone(name, clip, open_clip.get_tokenizer(name), mean, std, pretrained=source)
    backbone.preprocess = Compose(pixel_steps)
    if adapter_state:
        backbone.load_adapter_state(adapter_state)
    return backbone.to(device).eval()
