"""The one backbone wrapper every CMAI component talks to.

`Backbone` wraps an open_clip CLIP model behind a small, stable API:

* images enter as float tensors in ``[0, 1]`` of shape ``(N, 3, S, S)`` (``S = image_size``);
  the model's mean/std normalisation happens inside, so attacks can keep their
  perturbations in pixel space and clamp to the valid range;
* text enters as token ids from :meth:`Backbone.tokenize` (open_clip's BPE tokenizer);
* the zero-shot head is ``logit_scale · norm(e_image) @ norm(e_class)ᵀ`` over class-prompt
  embeddings (a prompt-template ensemble, as in CLIP);
* :meth:`Backbone.hidden_states` exposes pooled embeddings and, on request, per-layer token
  states, which is what the environment builds observations from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.transformer import text_global_pool


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
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled text embeddings ``e_t`` (N, D), L2-normalised by default."""
        return self.clip.encode_text(tokens, normalize=normalize)

    # ------------------------------------------------------------------ images
    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled image embeddings ``e_v`` (N, D) from pixels in [0, 1]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"{self.name} expects images of {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}; "
                "load the dataset with image_size=backbone.image_size"
            )
        return self.clip.encode_image(self.normalize_pixels(images), normalize=normalize)

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
        out = self.clip.forward_intermediates(
            image=self.normalize_pixels(images),
            text=tokens,
            normalize=True,
            image_output_fmt="NLC",
        )
        return HiddenStates(
            image_embeds=out["image_features"],
            text_embeds=out["text_features"],
            image_layers=list(out["image_intermediates"]),
            text_layers=list(out["text_intermediates"]),
        )

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> HiddenStates:
        return self.hidden_states(images, tokens)
