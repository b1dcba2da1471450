"""The one backbone wrapper every CMAI component talks to.

`Backbone` wraps an open_clip CLIP model behind a small, stable API:

* images enter as float tensors in ``[0, 1]`` of shape ``(N, 3, S, S)`` (``S = image_size``);
  the model's mean/std normalisation happens inside, so attacks can keep their
  perturbations in pixel space and clamp to the valid range;
* text enters as token ids from :meth:`Backbone.tokenize` (open_clip's BPE tokenizer);
* the zero-shot head is ``logit_scale · norm(e_image) @ norm(e_class)ᵀ`` over class-prompt
  embeddings (a prompt-template ensemble, as in CLIP);
* :meth:`Backbone.hidden_states` exposes pooled embeddings and, on request, per-layer token
  states, which is what the environment builds observations from;
* :meth:`Backbone.add_adapters` attaches optional residual adapters on the pooled embeddings
  (``e ↦ e + W₂·gelu(W₁·e)``, identity at start) that adversarial training can tune while the
  pretrained weights stay fixed; every encoder path applies them, so attacks always target the
  current defended model.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.transformer import text_global_pool


#: checkpoint keys of the residual adapters (``cmai_adapters.image.*``, ``cmai_adapters.text.*``);
#: open_clip's own keys never start with it, so the loader can split them off.
ADAPTER_PREFIX = "cmai_adapters."


class ResidualAdapter(nn.Module):
    """``e ↦ e + W₂·gelu(W₁·e)`` on a pooled (pre-normalisation) embedding.

    ``W₂`` and its bias start at zero, so a fresh adapter is exactly the identity: adding one
    leaves the pretrained model's outputs bit-for-bit unchanged until it is trained.

    :param dim: embedding width ``D``.
    :param hidden: width of the bottleneck ``W₁ ∈ R^{hidden×D}``.
    :param generator: draws ``W₁`` (uniform in ±1/√D, ``nn.Linear``'s default range); seeded so
        that two environments built from the same scenario start from the same adapters.
    """

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"ResidualAdapter needs dim ≥ 1 and hidden ≥ 1, got dim={dim}, hidden={hidden}")
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        bound = 1.0 / math.sqrt(dim)
        with torch.no_grad():
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def hidden(self) -> int:
        return int(self.down.out_features)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e + self.up(F.gelu(self.down(e)))


@dataclass(frozen=True)
class HiddenStates:
    """What the defended model 'thinks' about a batch of image–text pairs.

    :param image_embeds: L2-normalised pooled image embeddings ``e_v``, shape (N, D).
    :param text_embeds: L2-normalised pooled text embeddings ``e_t``, shape (N, D).
    :param image_layers: per-layer image token states (each (N, T_v, W_v)), or None.
    :param text_layers: per-layer text token states (each (N, T_t, W_t)), or None.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_layers: list[torch.Tensor] | None = None
    text_layers: list[torch.Tensor] | None = None


class ZeroShotClassifier(nn.Module):
    """Images in [0, 1] → class logits, the (N, C) interface torchattacks and friends expect.

    ``logits = logit_scale · norm(encode_image(x)) @ class_embeds.T``
    """

    def __init__(self, backbone: "Backbone", class_embeds: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("class_embeds", class_embeds, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.zero_shot_logits(self.backbone.encode_image(images), self.class_embeds)


class Backbone(nn.Module):
    """An open_clip CLIP model with pixel-space inputs, tokenizer and zero-shot head.

    Build one with :func:`cmai_env.models.load_backbone`; the constructor takes an already
    created open_clip model.

    :param name: the architecture name (an open_clip model config name).
    :param clip: the open_clip ``CLIP`` module.
    :param tokenizer: the open_clip tokenizer for this architecture.
    :param mean: per-channel normalisation mean of the architecture's preprocessing.
    :param std: per-channel normalisation std.
    :param pretrained: where the weights came from (tag, path or None), for provenance.
    """

    def __init__(
        self,
        name: str,
        clip: nn.Module,
        tokenizer,
        mean: Sequence[float],
        std: Sequence[float],
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.pretrained = pretrained
        #: PIL image → float tensor in [0, 1] at ``image_size`` (resize + centre crop, no normalisation)
        self.preprocess = None
        self.clip = clip
        self.tokenizer = tokenizer
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # Optional residual adapters on the pooled embeddings (see add_adapters); None = absent.
        self.register_module("image_adapter", None)
        self.register_module("text_adapter", None)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.clip.token_embedding.weight.shape[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.clip.token_embedding.weight.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(t)`` of CLIP's learned temperature, clamped to 100 as in CLIP."""
        return self.clip.logit_scale.exp().clamp(max=100.0)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_token_id)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Token ids (N, context_length) on the backbone's device."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input token embeddings (N, L, W): the space continuous text attacks perturb."""
        return self.clip.token_embedding(tokens)

    def encode_text_embeddings(self, token_embeds: torch.Tensor, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text encoder from input token embeddings instead of ids.

        ``tokens`` still decides where the end-of-text token is pooled, so a perturbed embedding
        sequence is pooled exactly where the clean one would be.
        """
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = token_embeds.to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        if self.text_adapter is not None:
            x = self.text_adapter(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled text embeddings ``e_t`` (N, D), L2-normalised by default (after the text adapter, if any)."""
        if self.text_adapter is None:
            return self.clip.encode_text(tokens, normalize=normalize)
        x = self.text_adapter(self.clip.encode_text(tokens, normalize=False))
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ images
    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point():
            raise ValueError(f"{self.name} expects float images with pixels in [0, 1], got dtype {images.dtype}")
        # float64 (or half) pixels follow the model's dtype; the cast is differentiable.
        images = images.to(self.pixel_mean.dtype)
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled image embeddings ``e_v`` (N, D) from pixels in [0, 1]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"{self.name} expects images of {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}; "
                "load the dataset with image_size=backbone.image_size"
            )
        if self.image_adapter is None:
            return self.clip.encode_image(self.normalize_pixels(images), normalize=normalize)
        x = self.image_adapter(self.clip.encode_image(self.normalize_pixels(images), normalize=False))
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ zero-shot
    @torch.no_grad()
    def class_text_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Prompt-ensemble class embeddings (C, D), each the renormalised mean over templates."""
        prompts = [t.format(c) for c in class_names for t in templates]
        embeds = self.encode_text(self.tokenize(prompts)).view(len(class_names), len(templates), -1)
        return F.normalize(embeds.mean(dim=1), dim=-1)

    def zero_shot_logits(self, image_or_text_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
        """``logit_scale · norm(e) @ norm(e_class)ᵀ`` for image *or* caption embeddings."""
        return self.logit_scale * F.normalize(image_or_text_embeds, dim=-1) @ class_embeds.T

    def zero_shot_classifier(self, class_names: Sequence[str], templates: Sequence[str]) -> ZeroShotClassifier:
        """A module mapping images in [0, 1] to (N, C) logits (for torchattacks-style tools)."""
        return ZeroShotClassifier(self, self.class_text_embeddings(class_names, templates))

    @torch.no_grad()
    def zero_shot_accuracy(
        self, images: torch.Tensor, labels: torch.Tensor, class_embeds: torch.Tensor, batch_size: int = 256
    ) -> float:
        """Top-1 zero-shot accuracy of ``images`` against ``class_embeds``."""
        correct = 0
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device)
            logits = self.zero_shot_logits(self.encode_image(batch), class_embeds)
            correct += int((logits.argmax(dim=-1).cpu() == labels[start : start + batch_size].cpu()).sum())
        return correct / max(len(images), 1)

    # ------------------------------------------------------------------ hidden states
    def hidden_states(self, images: torch.Tensor, tokens: torch.Tensor, per_layer: bool = False) -> HiddenStates:
        """Pooled (and optionally per-layer) states of both towers for a batch of pairs."""
        if not per_layer:
            return HiddenStates(self.encode_image(images), self.encode_text(tokens))
        adapted = self.image_adapter is not None or self.text_adapter is not None
        out = self.clip.forward_intermediates(
            image=self.normalize_pixels(images),
            text=tokens,
            normalize=not adapted,
            image_output_fmt="NLC",
        )
        image_embeds, text_embeds = out["image_features"], out["text_features"]
        if adapted:
            # Adapters act on the unnormalised pooled embeddings, exactly as in encode_image/encode_text.
            if self.image_adapter is not None:
                image_embeds = self.image_adapter(image_embeds)
            if self.text_adapter is not None:
                text_embeds = self.text_adapter(text_embeds)
            image_embeds, text_embeds = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        return HiddenStates(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            image_layers=list(out["image_intermediates"]),
            text_layers=list(out["text_intermediates"]),
        )

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> HiddenStates:
        return self.hidden_states(images, tokens)

    # ------------------------------------------------------------------ adapters
    @property
    def has_adapters(self) -> bool:
        return self.image_adapter is not None or self.text_adapter is not None

    def add_adapters(self, hidden: int, seed: int = 0) -> tuple[ResidualAdapter, ResidualAdapter]:
        """Attach identity-initialised residual adapters on the pooled image and text embeddings.

        ``e_v ← e_v + W₂ᵛ·gelu(W₁ᵛ·e_v)`` and ``e_t ← e_t + W₂ᵗ·gelu(W₁ᵗ·e_t)`` before the L2
        normalisation, in every encoder path (images, token ids, token embeddings, class prompts).
        Idempotent for the same ``hidden``; adapters of another width are an error (their trained
        weights would be silently dropped).

        :param hidden: bottleneck width of each adapter.
        :param seed: seeds the adapters' random down-projections (the up-projections are zero).
        :return: the (image, text) adapters.
        """
        if self.has_adapters:
            widths = {a.hidden for a in (self.image_adapter, self.text_adapter) if a is not None}
            if widths != {hidden} or self.image_adapter is None or self.text_adapter is None:
                raise ValueError(f"{self.name} already has adapters of hidden width {sorted(widths)}, asked for {hidden}")
            return self.image_adapter, self.text_adapter
        ref = self.clip.text_projection
        dtype = ref.weight.dtype if isinstance(ref, nn.Linear) else ref.dtype
        generator = torch.Generator().manual_seed(seed)
        self.image_adapter = ResidualAdapter(self.embed_dim, hidden, generator).to(device=self.device, dtype=dtype)
        self.text_adapter = ResidualAdapter(self.embed_dim, hidden, generator).to(device=self.device, dtype=dtype)
        return self.image_adapter, self.text_adapter

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a fine-tuned checkpoint holds: open_clip's state dict plus ``cmai_adapters.*`` keys.

        :func:`cmai_env.models.load_backbone` reads both back (the adapters are rebuilt from the
        shapes of their weights).
        """
        state = {k: v.detach().clone() for k, v in self.clip.state_dict().items()}
        for tower, adapter in (("image", self.image_adapter), ("text", self.text_adapter)):
            if adapter is not None:
                state.update({f"{ADAPTER_PREFIX}{tower}.{k}": v.detach().clone() for k, v in adapter.state_dict().items()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild adapters from ``cmai_adapters.*`` keys of a checkpoint (see :meth:`checkpoint_state_dict`)."""
        own = {k.removeprefix(ADAPTER_PREFIX): v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
        if not own:
            return
        towers = {k.split(".", 1)[0] for k in own}
        if towers != {"image", "text"}:
            raise ValueError(f"adapter checkpoint keys must cover the image and text towers, got {sorted(towers)}")
        hidden = own.get("image.down.weight")
        if hidden is None or hidden.ndim != 2 or hidden.shape[1] != self.embed_dim:
            raise ValueError(f"adapter weights do not fit embed_dim {self.embed_dim} of {self.name}")
        image, text = self.add_adapters(int(hidden.shape[0]))
        for tower, adapter in (("image", image), ("text", text)):
            part = {k.split(".", 1)[1]: v.float() for k, v in own.items() if k.startswith(tower + ".")}
            adapter.load_state_dict(part)
