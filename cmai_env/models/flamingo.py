"""``cmai-tiny-flamingo``: a generative backbone, the Flamingo architecture on cmai-tiny's open_clip tower.

Architecture (Alayrac et al., 2022; read the shapes at the end of this docstring)::

    x ∈ [0,1]^{3×32×32} ──► cmai-tiny open_clip ViT (frozen) ──► 17 patch+CLS tokens (N, 17, 96)
                                 │ pooled, projected: e_v (N, 64)   ──► CLIP zero-shot, consistency
                                 ▼
                         perceiver resampler ──► 8 latents (N, 8, 96)
                                 ▼
    [BOS] prompt words ──► decoder layer ─┬─ gated cross-attention (tanh(α)·attn(text → latents))
                                          └─ self-attention + MLP   (× 2, cross-attention before each)
                                 ▼
                          next-word logits over a 36-word vocabulary

**Why transformers' IDEFICS.** IDEFICS is Hugging Face's maintained open reproduction of
Flamingo (perceiver resampler, gated cross-attention every ``cross_layer_interval`` decoder
layers, freezable towers). It builds from a config with no download and its forward accepts
``perceiver_embeddings``/``image_encoder_embeddings``, so an open_clip tower's tokens feed it
directly. ``open-flamingo`` pins ``torch==2.0.1`` and cannot be installed beside this project;
its code is neither installed nor copied. IDEFICS always builds its own CLIP vision tower; it is
removed after construction (cmai-tiny's open_clip tower replaces it) so it costs nothing.

**Tokenizer.** No hub downloads: a word-level ``tokenizers`` tokenizer over the shapes
vocabulary (:func:`shapes_vocabulary`), saved as JSON beside the checkpoint (never pickled).

**Checkpoint.** ``weights/cmai-tiny-flamingo.pt`` holds ``clip.*`` (cmai-tiny's weights, frozen
during pretraining, so the CLIP head is exactly cmai-tiny's) and ``lm.*`` (resampler,
cross-attention, decoder) in fp16; provenance in ``weights/cmai-tiny-flamingo.json``.

The generative API on top of :class:`~cmai_env.models.backbone.Backbone` (whose CLIP methods
all still work):

* :meth:`FlamingoBackbone.generate` — greedy captions for images after a prompt;
* :meth:`FlamingoBackbone.class_log_likelihoods` — ``log p_LM(template(c) | x)`` for every class
  ``c`` (differentiable in the pixels), the language model's class distribution;
* :meth:`FlamingoBackbone.hidden_states` — CLIP pair states plus, with ``per_layer``, the vision
  tokens and the decoder's per-layer states for the caption.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmai_env.models.backbone import ADAPTER_PREFIX, Backbone, HiddenStates

#: checkpoint key prefixes of the two parts of a flamingo checkpoint
CLIP_PREFIX = "clip."
LM_PREFIX = "lm."
#: keys of the language model's own (robust) vision tower, present once it has been split off
VISION_PREFIX = "lm_visual."
PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 (IDEFICS's pad/bos/eos defaults)
_WORD = re.compile(r"\w+|[^\w\s]+")


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FlamingoSpec:
    """A generative architecture config (``configs/<name>.json`` with ``"architecture": "flamingo"``).

    :param name: architecture name (the config file's stem).
    :param vision_backbone: the open_clip backbone whose vision tower feeds the resampler.
    :param prompt: default prompt that generation continues (``"a photo of a"``).
    :param class_template: caption scored per class by :meth:`FlamingoBackbone.class_log_likelihoods`;
        the words before ``{}`` are the prompt, the class name and the rest the continuation.
    :param max_new_tokens: default generation length.
    :param lm: :class:`transformers.IdeficsConfig` fields of the language model.
    """

    name: str
    vision_backbone: str
    prompt: str
    class_template: str
    max_new_tokens: int
    lm: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> "FlamingoSpec":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"could not read generative backbone config {path}: {exc}") from exc
        allowed = {"architecture", "vision_backbone", "prompt", "class_template", "max_new_tokens", "lm"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        if raw.get("architecture") != "flamingo":
            raise ValueError(f"{path}: field 'architecture' must be 'flamingo', got {raw.get('architecture')!r}")
        template = raw.get("class_template", "a photo of a {}")
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"{path}: field 'class_template' must hold exactly one '{{}}', got {template!r}")
        max_new = raw.get("max_new_tokens", 6)
        if not isinstance(max_new, int) or max_new < 1:
            raise ValueError(f"{path}: field 'max_new_tokens' must be a positive integer, got {max_new!r}")
        if not isinstance(raw.get("lm", {}), dict):
            raise ValueError(f"{path}: field 'lm' must be an object of IdeficsConfig fields, got {raw.get('lm')!r}")
        return cls(
            name=Path(path).stem,
            vision_backbone=str(raw.get("vision_backbone", "cmai-tiny")),
            prompt=str(raw.get("prompt", "a photo of a")),
            class_template=template,
            max_new_tokens=max_new,
            lm=dict(raw.get("lm", {})),
        )




# ---------------------------------------------------------------------------- tokenizer
def shapes_vocabulary() -> list[str]:
    """Every word of the shapes captions and class prompts, sorted (the LM's vocabulary after the specials)."""
    from cmai_env.data.shapes import CAPTION_TEMPLATES, COLOURS, SHAPES, TEMPLATES

    words: set[str] = set(COLOURS) | set(SHAPES) | {"small", "large"}
    for template in [*CAPTION_TEMPLATES, *TEMPLATES]:
        text = re.sub(r"\{\w*\}", " ", template)
        words.update(_WORD.findall(text.lower()))
    return sorted(words)


def build_tokenizer(words: Sequence[str]):
    """A word-level ``tokenizers.Tokenizer``: lower-cased, split on whitespace and punctuation.

    Ids 0–3 are ``[PAD] [BOS] [EOS] [UNK]``; words follow in the given order.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def load_tokenizer(path: Path):
    """Read a tokenizer JSON file (the ``tokenizers`` format; plain data, no code runs)."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a generic Exception for malformed files
        raise ValueError(f"could not read tokenizer {path}: {exc}") from exc
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise ValueError(f"tokenizer {path}: special token {token} must have id {i}, has {tokenizer.token_to_id(token)}")
    return tokenizer


# ---------------------------------------------------------------------------- the model
def build_language_model(spec: FlamingoSpec, vocab_size: int, vision_width: int, image_size: int):
    """The IDEFICS language model (resampler + gated cross-attention + decoder) without its own vision tower."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    fixed = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "vision_config"}
    clash = sorted(fixed & set(spec.lm))
    if clash:
        raise ValueError(f"config {spec.name}: lm field(s) {clash} are set by CMAI (tokenizer, vision tower), remove them")
    lm_fields = dict(spec.lm)
    config = IdeficsConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # Only the embedding width matters: cross-attention keys/values and the resampler read
        # cmai-tiny's tokens of this width. The tower IDEFICS builds from it is dropped below.
        vision_config={"embed_dim": vision_width, "image_size": image_size, "patch_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 1, "intermediate_size": 4},
        freeze_text_layers=False,
        freeze_vision_layers=True,
        freeze_lm_head=False,
        tie_word_embeddings=False,
        use_cache=False,
        **lm_fields,
    )
    torch_state = torch.random.get_rng_state()
    try:
        model = IdeficsForVisionText2Text(config)
    finally:
        torch.random.set_rng_state(torch_state)  # building must not move the caller's global RNG
    model.model.vision_model = None
    return model


class FlamingoBackbone(Backbone):
    """A Flamingo-style captioning model on an open_clip CLIP (see the module docstring).

    Everything :class:`Backbone` offers (``encode_image``, ``encode_text``, CLIP zero-shot,
    adapters) acts on the CLIP part; the language model adds generation and class likelihoods.

    :param name: architecture name.
    :param clip_backbone: the loaded open_clip :class:`Backbone` whose tower feeds the LM.
    :param lm: an ``IdeficsForVisionText2Text`` without its vision tower.
    :param lm_tokenizer: the word-level ``tokenizers.Tokenizer`` of the LM.
    :param spec: the architecture config.
    :param pretrained: where the weights came from, for provenance.
    """

    generative = True

    def __init__(self, name: str, clip_backbone: Backbone, lm: nn.Module, lm_tokenizer, spec: FlamingoSpec, pretrained: str | None = None) -> None:
        super().__init__(
            name, clip_backbone.clip, clip_backbone.tokenizer,
            clip_backbone.pixel_mean.flatten().tolist(), clip_backbone.pixel_std.flatten().tolist(), pretrained,
        )
        self.preprocess = clip_backbone.preprocess
        self.lm = lm
        self.lm_tokenizer = lm_tokenizer
        self.spec = spec
        #: ``lm_visual``, the vision tower the *language model* reads; ``None``: it shares
        #: ``clip.visual`` (as pretrained). :meth:`split_vision_tower` gives the LM its own copy, which the defence
        #: (FARE, :mod:`cmai_env.models.flamingo_defence`) makes robust.
        self.register_module("lm_visual", None)

    # ------------------------------------------------------------------ vision side
    @property
    def lm_vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    def _tower_pass(self, tower: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, tokens)`` of one open_clip vision tower on images in [0, 1]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"{self.name} expects images of {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        out = tower.forward_intermediates(
            self.normalize_pixels(images), indices=1, normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True
        )
        return out["image_features"], torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)

    def vision_tokens(self, images: torch.Tensor, tower: nn.Module | None = None) -> torch.Tensor:
        """Class and patch tokens (N, 1 + P, W) of the LM's tower (or of ``tower``), what the resampler reads."""
        return self._tower_pass(self.lm_vision_tower if tower is None else tower, images)[1]

    @property
    def lm_vision_tower(self) -> nn.Module:
        """The tower whose tokens the language model reads: its own copy once split, else ``clip.visual``."""
        return self.clip.visual if self.lm_visual is None else self.lm_visual

    def split_vision_tower(self) -> nn.Module:
        """Give the language model its own copy of the vision tower (idempotent) and return it.

        Afterwards the CLIP head (``encode_image``, zero-shot, the consistency reference) keeps
        the original tower and the captions read the copy, so the copy can be fine-tuned without
        moving the CLIP reference.
        """
        if self.lm_visual is None:
            import copy

            self.lm_visual = copy.deepcopy(self.clip.visual)
        return self.lm_visual

    def visual_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision side of a pair: ``(e_v, tokens)``.

        ``e_v`` (N, D) is the normalised pooled CLIP embedding (after the image adapter, as
        :meth:`encode_image`); ``tokens`` (N, 1 + P, W) are the class and patch tokens of the last
        block after ``ln_post``, what the resampler reads. One pass of ``clip.visual`` while the
        LM shares it; two (CLIP tower, LM tower) once :meth:`split_vision_tower` has run.
        """
        pooled, tokens = self._tower_pass(self.clip.visual, images)
        if self.lm_visual is not None:
            tokens = self.vision_tokens(images)
        if self.image_adapter is not None:
            pooled = self.image_adapter(pooled)
        return F.normalize(pooled, dim=-1), tokens

    def resample(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Perceiver-resampler latents (N, n_latents, W) from vision tokens."""
        return self.lm.model.perceiver_resampler(vision_tokens)

    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Resampled latents of images in [0, 1] (the only way the LM sees an image)."""
        return self.resample(self.vision_tokens(images))

    # ------------------------------------------------------------------ language side
    def lm_encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (no special tokens); unknown words map to ``[UNK]``."""
        return self.lm_tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, prompt: str | None = None, n: int = 1) -> torch.Tensor:
        """``[BOS] + words(prompt)`` as (n, L_p) ids on the device (``prompt=None``: the default prompt)."""
        prompt = self.spec.prompt if prompt is None else prompt
        ids = torch.tensor([1, *self.lm_encode(prompt)], dtype=torch.long, device=self.device)
        return ids.unsqueeze(0).expand(n, -1).contiguous()

    def lm_token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (…, W) of LM token ids: the space prompt attacks perturb."""
        return self.lm.model.embed_tokens(ids)

    def lm_forward(
        self,
        latents: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        cache=None,
        use_cache: bool = False,
    ):
        """The IDEFICS forward on resampled latents; every text position sees the one image."""
        n, length = inputs_embeds.shape[:2]
        image_mask = torch.ones((n, length, 1), dtype=torch.long, device=inputs_embeds.device)
        return self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            perceiver_embeddings=latents,
            image_attention_mask=image_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )

    def continuation_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``words(text) + [EOS]`` per text, right-padded: ids (C, L_c) and a bool mask (C, L_c)."""
        seqs = [[*self.lm_encode(t), 2] for t in texts]
        unknown = [t for t, s in zip(texts, seqs) if 3 in s]  # [UNK]: every such class would score alike
        if unknown:
            raise ValueError(
                f"{self.name}'s language model has no word for {unknown[:5]} (its vocabulary is the shapes words); "
                "a generative backbone runs on the shapes dataset"
            )
        length = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), length), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), length), dtype=torch.bool, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, device=self.device)
            mask[i, : len(s)] = True
        return ids, mask

    def continuation_log_likelihoods(
        self, latents: torch.Tensor, prompt_embeds: torch.Tensor, cont_ids: torch.Tensor, cont_mask: torch.Tensor
    ) -> torch.Tensor:
        """``log p_LM(continuation_c | x, prompt) = Σ_j log p(w_cj | x, prompt, w_c<j)`` as (N, C).

        :param latents: (N, n_latents, W) resampled image latents.
        :param prompt_embeds: (N, L_p, W) prompt input embeddings (BOS included).
        :param cont_ids: (C, L_c) continuation ids from :meth:`continuation_ids`; ``cont_mask`` their mask.
        """
        n, lp, width = prompt_embeds.shape
        c, lc = cont_ids.shape
        # The prompt is shared by all C continuations of an image: run it once with a KV cache,
        # repeat the cache C times and run only the continuations (≈ 2.5× less work than N·C
        # full sequences; gradients flow through the cached keys/values).
        head = self.lm_forward(latents, prompt_embeds, use_cache=True)
        cache = head.cache
        cache.batch_repeat_interleave(c)
        cont_embeds = self.lm_token_embeddings(cont_ids)[None].expand(n, c, lc, width).reshape(n * c, lc, width)
        attention = torch.cat([cont_mask.new_ones((c, lp)), cont_mask], dim=1)[None].expand(n, c, lp + lc).reshape(n * c, -1)
        tail = self.lm_forward(latents.repeat_interleave(c, dim=0), cont_embeds, attention.long(), cache=cache, use_cache=True)
        # the prompt's last position predicts continuation word 0, continuation position j word j+1
        first = F.log_softmax(head.logits[:, -1].float(), dim=-1)  # (N, V)
        rest = F.log_softmax(tail.logits[:, :-1].float(), dim=-1).view(n, c, lc - 1, -1)
        picked = torch.cat(
            [first[:, cont_ids[:, 0]].unsqueeze(-1), rest.gather(-1, cont_ids[None, :, 1:, None].expand(n, c, lc - 1, 1)).squeeze(-1)],
            dim=-1,
        )
        return (picked * cont_mask[None]).sum(-1)

    def split_template(self, template: str | None = None) -> tuple[str, str]:
        """``(prompt, suffix)`` of a class template (``"a photo of a {}"`` → ``("a photo of a", "")``)."""
        template = self.spec.class_template if template is None else template
        if template.count("{}") != 1:
            raise ValueError(f"class template must hold exactly one '{{}}', got {template!r}")
        prompt, suffix = template.split("{}")
        return prompt.strip(), suffix

    def class_log_likelihoods(self, images: torch.Tensor, class_names: Sequence[str], template: str | None = None) -> torch.Tensor:
        """``log p_LM(template(c) | x)`` for every class ``c``: (N, C), differentiable in ``images``.

        The words before ``{}`` are the prompt; the score sums the log-probabilities of the class
        name, the rest of the template and the end-of-caption token. ``softmax`` over classes is
        the language model's class distribution ``p_LM(c | x)``.
        """
        prompt, suffix = self.split_template(template)
        cont_ids, cont_mask = self.continuation_ids([f"{name}{suffix}" for name in class_names])
        prompt_embeds = self.lm_token_embeddings(self.prompt_ids(prompt, len(images)))
        return self.continuation_log_likelihoods(self.image_latents(images), prompt_embeds, cont_ids, cont_mask)

    @torch.no_grad()
    def greedy_ids(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation ids (N, ≤ max_new_tokens), ``[PAD]`` after each ``[EOS]``.

        Hand-written rather than ``GenerationMixin.generate`` because attacks generate from
        *perturbed prompt embeddings* with latents computed once; sequences are ≤ 16 words, so
        re-running the whole prefix each step (no KV cache) costs little.
        """
        n = len(latents)
        embeds = prompt_embeds
        done = torch.zeros(n, dtype=torch.bool, device=latents.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.lm_forward(latents, embeds).logits[:, -1].float()
            logits[:, [0, 1]] = -float("inf")  # never [PAD] or [BOS]
            nxt = logits.argmax(-1).masked_fill(done, 0)
            out.append(nxt)
            done |= nxt == 2
            if bool(done.all()):
                break
            embeds = torch.cat([embeds, self.lm_token_embeddings(nxt)[:, None]], dim=1)
        return torch.stack(out, dim=1) if out else torch.zeros((n, 0), dtype=torch.long, device=latents.device)

    def decode(self, prompt: str, ids: torch.Tensor) -> list[str]:
        """Full captions: the prompt followed by the decoded continuation (special tokens dropped)."""
        words = self.lm_tokenizer.decode_batch(ids.tolist(), skip_special_tokens=True)
        return [f"{prompt} {w}".strip() for w in words]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt: str | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Greedy captions ``prompt + continuation`` for a batch of images in [0, 1]."""
        prompt = self.spec.prompt if prompt is None else prompt
        steps = self.spec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if steps < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        latents = self.image_latents(images)
        ids = self.greedy_ids(latents, self.lm_token_embeddings(self.prompt_ids(prompt, len(images))), steps)
        return self.decode(prompt, ids)

    # ------------------------------------------------------------------ hidden states
    def hidden_states(self, images: torch.Tensor, tokens: torch.Tensor, per_layer: bool = False) -> HiddenStates:
        """CLIP pair states (as :class:`Backbone`); with ``per_layer`` the layers are the LM's.

        ``image_layers`` = [vision tokens (N, 17, 96), resampled latents (N, 8, 96)];
        ``text_layers`` = the decoder's input and per-layer states (N, L, 64) for the default
        prompt continued by the model's own greedy caption.
        """
        if not per_layer:
            return super().hidden_states(images, tokens)
        e_v, vision_tokens = self.visual_features(images)
        latents = self.resample(vision_tokens)
        prompt_embeds = self.lm_token_embeddings(self.prompt_ids(None, len(images)))
        generated = self.greedy_ids(latents, prompt_embeds, self.spec.max_new_tokens)
        embeds = torch.cat([prompt_embeds, self.lm_token_embeddings(generated)], dim=1)
        mask = torch.cat([torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=self.device), (generated != 0).long()], 1)
        out = self.lm_forward(latents, embeds, mask, output_hidden_states=True)
        return HiddenStates(e_v, self.encode_text(tokens), [vision_tokens, latents], list(out.hidden_states))

    # ------------------------------------------------------------------ parsing
    @staticmethod
    def caption_classes(captions: Sequence[str], class_names: Sequence[str]) -> torch.Tensor:
        """Class each caption names: the one class all of whose words occur in it, else −1 (none or ambiguous)."""
        class_words = [set(_WORD.findall(name.lower())) for name in class_names]
        out = []
        for caption in captions:
            words = set(_WORD.findall(caption.lower()))
            hits = [i for i, cw in enumerate(class_words) if cw <= words]
            out.append(hits[0] if len(hits) == 1 else -1)
        return torch.tensor(out, dtype=torch.long)

    # ------------------------------------------------------------------ checkpoints
    def defended_parameters(self) -> list[nn.Parameter]:
        """What adversarial fine-tuning of the generative model updates: the LM's own vision tower.

        The choice follows FARE (Schlarmann et al., ICML 2024): make the *vision encoder* robust,
        because an image perturbation enters the caption only through its tokens. The first call
        splits the tower (:meth:`split_vision_tower`): the language model then reads a trainable
        copy of cmai-tiny's tower (its 17 CLS+patch tokens feed the resampler), while the CLIP
        head keeps the original, frozen tower, so the consistency check's reference
        (``e_v``, CLIP zero-shot) is exactly cmai-tiny's. Resampler, cross-attention and decoder
        are not defended: PGD-AT of the resampler and gated cross-attention on the caption loss,
        with the tower frozen, left PGD-10 ASR at 1.000 (README, "Generative backbone").
        """
        return list(self.split_vision_tower().parameters())

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """``clip.*`` (open_clip), ``lm.*`` (IDEFICS), ``lm_visual.*`` (once split) and ``cmai_adapters.*`` keys."""
        base = super().checkpoint_state_dict()
        state = {(k if k.startswith(ADAPTER_PREFIX) else CLIP_PREFIX + k): v for k, v in base.items()}
        state.update({LM_PREFIX + k: v.detach().clone() for k, v in self.lm.state_dict().items()})
        if self.lm_visual is not None:
            state.update({VISION_PREFIX + k: v.detach().clone() for k, v in self.lm_visual.state_dict().items()})
        return state


# ---------------------------------------------------------------------------- loading
def tokenizer_file(weights_folder: Path, name: str) -> Path:
    return weights_folder / f"{name}.tokenizer.json"


def load_flamingo(
    name: str, config_path: Path, pretrained: str | None, device: str | torch.device, weights_folder: Path
) -> FlamingoBackbone:
    """Build a :class:`FlamingoBackbone` (called by :func:`cmai_env.models.load_backbone`).

    :param pretrained: ``None`` — the embedded checkpoint if shipped, else cmai-tiny's CLIP with a
        random language model; ``"random"`` — the same CLIP start with a random LM (what
        pretraining starts from); a path — a checkpoint with ``clip.*``/``lm.*`` keys.
    """
    from cmai_env.models.registry import load_backbone, read_state_dict

    spec = FlamingoSpec.from_file(config_path)
    if pretrained is None:
        embedded = weights_folder / f"{name}.pt"
        weights_path = embedded if embedded.is_file() else None
    elif pretrained == "random":
        weights_path = None
    else:
        weights_path = Path(pretrained).expanduser()
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"pretrained checkpoint {weights_path} does not exist; for {name} pass an existing .pt file, "
                "'random' (cmai-tiny CLIP + random language model), or nothing for the embedded default"
            )
    tok_path = tokenizer_file(weights_folder, name)
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else build_tokenizer(shapes_vocabulary())
    clip_backbone = load_backbone(spec.vision_backbone)  # its embedded weights; a checkpoint's clip.* replace them
    lm = build_language_model(spec, tokenizer.get_vocab_size(), clip_backbone.clip.visual.transformer.width, clip_backbone.image_size)
    backbone = FlamingoBackbone(name, clip_backbone, lm, tokenizer, spec, pretrained=None if weights_path is None else str(weights_path))
    if weights_path is not None:
        state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(weights_path).items()}
        adapters = {k: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
        parts = {}
        modules = [(CLIP_PREFIX, backbone.clip), (LM_PREFIX, backbone.lm)]
        if any(k.startswith(VISION_PREFIX) for k in state):  # a defended checkpoint: the LM has its own tower
            modules.append((VISION_PREFIX, backbone.split_vision_tower()))
        for prefix, module in modules:
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            expected = module.state_dict()
            missing, unexpected = sorted(set(expected) - set(part)), sorted(set(part) - set(expected))
            mismatched = [f"{k} {tuple(v.shape)}≠{tuple(expected[k].shape)}" for k, v in part.items() if k in expected and v.shape != expected[k].shape]
            if missing or unexpected or mismatched:
                raise ValueError(
                    f"checkpoint {weights_path} does not fit architecture {name} ({prefix}* keys): missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}"
                )
            parts[prefix] = part
        other = sorted(k for k in state if not k.startswith((CLIP_PREFIX, LM_PREFIX, VISION_PREFIX, ADAPTER_PREFIX)))
        if other:
            raise ValueError(f"checkpoint {weights_path}: keys outside clip.*/lm.*/{VISION_PREFIX}*/{ADAPTER_PREFIX}*: {other[:5]}")
        for prefix, module in modules:
            module.load_state_dict(parts[prefix])
        if adapters:
            backbone.load_adapter_state(adapters)
    return backbone.to(device).eval()


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_generative(backbone: FlamingoBackbone, data, batch_size: int = 250, prompt: str | None = None) -> dict:
    """Caption and zero-shot accuracy of a generative backbone on a captioned dataset.

    * ``caption_accuracy``: share of images whose greedy caption (after ``prompt``) names exactly
      the right class (for shapes: the right colour *and* shape, see :meth:`FlamingoBackbone.caption_classes`);
    * ``zero_shot_accuracy``: top-1 of the class log-likelihoods ``log p_LM(template(c) | x)``;
    * ``clip_zero_shot_accuracy``: the CLIP head's zero-shot accuracy (the consistency reference).
    """
    class_embeds = backbone.class_text_embeddings(data.class_names, data.templates)
    caption_ok = lm_ok = clip_ok = 0
    examples: list[str] = []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(backbone.device)
        labels = data.labels[start : start + batch_size]
        captions = backbone.generate(images, prompt)
        examples.extend(captions[: max(0, 3 - len(examples))])
        caption_ok += int((backbone.caption_classes(captions, data.class_names) == labels).sum())
        lm_ok += int((backbone.class_log_likelihoods(images, data.class_names).argmax(-1).cpu() == labels).sum())
        clip_ok += int((backbone.zero_shot_logits(backbone.encode_image(images), class_embeds).argmax(-1).cpu() == labels).sum())
    n = max(len(data), 1)
    return {
        "prompt": backbone.spec.prompt if prompt is None else prompt,
        "class_template": backbone.spec.class_template,
        "caption_accuracy": caption_ok / n,
        "zero_shot_accuracy": lm_ok / n,
        "clip_zero_shot_accuracy": clip_ok / n,
        "example_captions": examples,
    }


def parameter_counts(backbone: FlamingoBackbone) -> dict[str, int]:
    """Parameters per part (for the model card)."""
    model = backbone.lm.model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "clip_vision_tower": count(backbone.clip.visual),
        "clip_text_tower": count(backbone.clip) - count(backbone.clip.visual),
        "perceiver_resampler": count(model.perceiver_resampler),
        "gated_cross_attention": count(model.gated_cross_attn_layers),
        "decoder": count(model.layers) + count(model.embed_tokens) + count(model.norm) + count(backbone.lm.lm_head),
    }


__all__ = [
    "FlamingoBackbone",
    "FlamingoSpec",
    "build_language_model",
    "build_tokenizer",
    "evaluate_generative",
    "load_flamingo",
    "load_tokenizer",
    "parameter_counts",
    "shapes_vocabulary",
]
