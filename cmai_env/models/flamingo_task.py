"""The attacked task of a generative backbone: captioning, scored by the class the caption names.

A pair is ``(x, P)``: an image and the *prompt* the model continues (``[BOS] a photo of a``);
``PairBatch.tokens`` are the prompt's LM ids and ``PairBatch.token_embeds`` its perturbed input
embeddings after a text-side attack. The model's outputs on a pair:

* the greedy caption ``ĉ = P + generate(x, P)`` and the class its generated words name, ``ŷ``
  (−1: none or several; words of the prompt do not count);
  a pair is *correct* when ``ŷ = y``, for every attacked modality (the caption is the model's
  only output), so ASR is the share of originally correct generations whose class changes;
* the LM's class distribution ``p_LM(c | x, P) = softmax_c log p_LM(words(c) [EOS] | x, P)``
  (:meth:`FlamingoBackbone.continuation_log_likelihoods`), the differentiable surrogate every
  attack ascends: ``TaskOutputs.image_logits`` and ``text_logits`` both hold it;
* CLIP's view of the same pair: ``e_v`` (the tower's pooled embedding), the CLIP text embedding
  ``e_ĉ`` of the generated caption and CLIP's zero-shot logits ``s·e_v·Cᵀ``.

``L_consistency`` (the detector's score) compares the two views:

    L_consistency = 2·(1 − cos(e_v, e_ĉ)) + λ·(KL(p_CLIP ‖ p_LM) + KL(p_LM ‖ p_CLIP))

(:func:`cmai_env.consistency.consistency_terms` over the modalities "CLIP" = (e_v, p_CLIP) and
"LM" = (e_ĉ, p_LM)). An attack that moves the caption but not CLIP's reading of the image
breaks both terms.

:func:`generative_attack` adapts the registered attacks to this task; each keeps its budget
parameters and threat model (which modality the attacker controls):

=========================  ======  ==============================================================
attack                     ctrl    on the generative task
=========================  ======  ==============================================================
``fgsm`` ``pgd_linf``      image   unchanged: ascend CE of ``p_LM(· | x, P)`` in pixel space
``pgd_l2`` ``universal``   image   unchanged (``task.image_logits`` is the LM's distribution)
``apgd_ce`` ``apgd_t``     image   the AutoAttack components and chain (torchattacks) on the
``fab_t`` ``square``               LM's class log-likelihoods instead of CLIP's zero-shot logits
``autoattack``                     (:class:`GenerativeClassifier`)
``bridge_image_to_text``   image   PGD-ℓ∞ pulling the image toward a wrong class's *caption*:
                                   ``max log p_LM(words(c*) | x+δ, P)``
``text_embedding_pgd``     text    PGD on the prompt's input embeddings (L2 per token, words
                                   only unless ``include_special``) against CE of ``p_LM``
``bridge_text_to_image``   text    the same pulling the caption toward class ``c*``:
                                   ``max log p_LM(words(c*) | x, P+δ)``
``token_substitution``     text    HotFlip on the prompt's words over the LM vocabulary
=========================  ======  ==============================================================

``c*`` follows the attack's ``target``: ``nearest`` (the wrong class with the highest LM
likelihood) or ``random``. Other attacks are refused with the list above.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, TaskOutputs, ZeroShotTask
from cmai_env.attacks.bridge import choose_wrong_class
from cmai_env.attacks.image import pgd_linf_ascent
from cmai_env.attacks.text import pgd_token_ascent
from cmai_env.consistency import consistency_terms
from cmai_env.data import CaptionedDataset
from cmai_env.model_configs import GENERATIVE_ATTACKS, GENERATIVE_CHAIN, GENERATIVE_UNCHANGED
from cmai_env.models.flamingo import FlamingoBackbone


@dataclass(frozen=True)
class GenerativeOutputs(TaskOutputs):
    """:class:`TaskOutputs` plus what only a generative model has.

    ``image_logits`` = ``text_logits`` = LM class log-likelihoods; ``text_embeds`` = CLIP
    embedding of the generated caption.
    """

    clip_logits: torch.Tensor  #: (N, C) CLIP zero-shot logits of the image
    generated_labels: torch.Tensor  #: (N,) class the generated caption names, −1 if none
    captions: tuple[str, ...]  #: the generated captions


class GenerativeTask(ZeroShotTask):
    """Captioning with a :class:`FlamingoBackbone`, behind the :class:`ZeroShotTask` interface.

    :param backbone: the generative backbone.
    :param class_names: class names of the dataset.
    :param templates: CLIP prompt templates (for the CLIP head and the consistency reference).
    :param kl_weight: λ of ``L_consistency``.
    :param class_template: caption scored per class (default: the backbone's, ``"a photo of a {}"``);
        the words before ``{}`` are the prompt every pair starts with.
    """

    def __init__(
        self, backbone: FlamingoBackbone, class_names: list[str], templates: list[str], kl_weight: float = 1.0, class_template: str | None = None
    ) -> None:
        if not isinstance(backbone, FlamingoBackbone):
            raise TypeError(f"GenerativeTask needs a generative backbone (e.g. cmai-tiny-flamingo), got {type(backbone).__name__}")
        super().__init__(backbone, class_names, templates, kl_weight)
        self.prompt, suffix = backbone.split_template(class_template)
        self.cont_ids, self.cont_mask = backbone.continuation_ids([f"{name}{suffix}" for name in self.class_names])

    @classmethod
    def from_dataset(cls, backbone: FlamingoBackbone, data: CaptionedDataset, kl_weight: float = 1.0) -> "GenerativeTask":
        return cls(backbone, data.class_names, data.templates, kl_weight)

    def pairs(self, data: CaptionedDataset) -> PairBatch:
        """The dataset's images with the task's prompt as their text."""
        backbone = self.backbone
        return PairBatch(data.images.to(backbone.device), backbone.prompt_ids(self.prompt, len(data)), data.labels.to(backbone.device))

    def prompt_embeds(self, batch: PairBatch) -> torch.Tensor:
        if batch.token_embeds is not None:
            return batch.token_embeds
        return self.backbone.lm_token_embeddings(batch.tokens)

    def lm_logits(self, images: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """``log p_LM(words(c) [EOS] | x, P)`` (N, C), differentiable in both."""
        return self.backbone.continuation_log_likelihoods(self.backbone.image_latents(images), prompt_embeds, self.cont_ids, self.cont_mask)

    def image_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The LM's class log-likelihoods after the clean prompt: what image attacks ascend CE on."""
        prompt = self.backbone.lm_token_embeddings(self.backbone.prompt_ids(self.prompt, len(images)))
        return self.lm_logits(images, prompt)

    def forward(self, batch: PairBatch) -> GenerativeOutputs:
        backbone = self.backbone
        e_v, vision_tokens = backbone.visual_features(batch.images)
        latents = backbone.resample(vision_tokens)
        prompt = self.prompt_embeds(batch)
        lm_logits = backbone.continuation_log_likelihoods(latents, prompt, self.cont_ids, self.cont_mask)
        generated = backbone.greedy_ids(latents.detach(), prompt.detach(), backbone.spec.max_new_tokens)
        continuations = backbone.lm_tokenizer.decode_batch(generated.tolist(), skip_special_tokens=True)
        # The caption is the prompt as given (a substituted word shows) plus what the model wrote;
        # only the written part counts for the class, so a class word planted in the prompt does not.
        prompts = backbone.lm_tokenizer.decode_batch(batch.tokens.tolist(), skip_special_tokens=True)
        captions = [f"{p} {c}".strip() for p, c in zip(prompts, continuations)]
        with torch.no_grad():
            caption_embeds = backbone.encode_text(backbone.tokenize(captions))
        return GenerativeOutputs(
            image_embeds=e_v,
            text_embeds=caption_embeds,
            image_logits=lm_logits,
            text_logits=lm_logits,
            clip_logits=backbone.zero_shot_logits(e_v, self.class_embeds),
            generated_labels=backbone.caption_classes(continuations, self.class_names).to(e_v.device),
            captions=tuple(captions),
        )

    def consistency(self, out: TaskOutputs) -> torch.Tensor:
        """Per-sample ``L_consistency`` between CLIP's and the LM's view (module docstring)."""
        if not isinstance(out, GenerativeOutputs):
            raise TypeError("GenerativeTask.consistency needs the GenerativeOutputs of GenerativeTask.forward")
        return consistency_terms([out.image_embeds, out.text_embeds], [out.clip_logits, out.image_logits], self.kl_weight).loss

    @staticmethod
    def correct(out: TaskOutputs, labels: torch.Tensor, modality: str) -> torch.Tensor:
        """Bool (N,): the generated caption names the right class (whatever the attacked modality)."""
        if not isinstance(out, GenerativeOutputs):
            raise TypeError("GenerativeTask.correct needs the GenerativeOutputs of GenerativeTask.forward")
        return out.generated_labels == labels


# ---------------------------------------------------------------------------- attacks
class GenerativeClassifier(torch.nn.Module):
    """Images in [0, 1] → the LM's class log-likelihoods (N, C) after the task's clean prompt.

    The ``(N, C)`` interface torchattacks expects, so the AutoAttack components attack the
    captions' class distribution (what the CLIP head's :class:`~cmai_env.models.ZeroShotClassifier`
    is for a contrastive task).
    """

    def __init__(self, task: "GenerativeTask") -> None:
        super().__init__()
        self.task = task
        # A submodule, as in ZeroShotClassifier: torchattacks reads the device from the model's
        # parameters and otherwise prints "Failed to set device automatically" on stdout.
        self.backbone = task.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.image_logits(images)


def _prompt_mask(batch: PairBatch, include_special: bool) -> torch.Tensor:
    """Editable prompt positions: the words (position 0 is ``[BOS]``; all of them with ``include_special``)."""
    mask = torch.ones_like(batch.tokens, dtype=torch.bool)
    if not include_special:
        mask[:, 0] = False
    return mask


def _wrong_classes(task: GenerativeTask, batch: PairBatch, rule: str, generator: torch.Generator | None) -> torch.Tensor:
    with torch.no_grad():
        logits = task.lm_logits(batch.images, task.prompt_embeds(batch))
    return choose_wrong_class(logits, batch.labels, rule, generator)


def _targeted(task: GenerativeTask, targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``logits ↦ Σ log p_LM(words(c*_i) | ·)``: raw caption log-likelihood of each sample's target class."""
    return lambda logits: logits.gather(1, targets[:, None]).sum()


class GenerativeAttack:
    """Mixin that runs a registered attack against a :class:`GenerativeTask` (module docstring's table).

    :func:`generative_attack` puts it in front of the attack's own class, so the result *is* an
    instance of that class (same ``name``, ``modality``, ``threat_model``, parameters) whose
    :meth:`perturb` speaks to the generative task.
    """

    def perturb(self, task: GenerativeTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        if not isinstance(task, GenerativeTask):
            raise TypeError(f"{self.name} (generative version) needs a GenerativeTask, got {type(task).__name__}")
        if self.name in GENERATIVE_UNCHANGED:
            return super().perturb(task, batch, generator)
        if self.name in GENERATIVE_CHAIN:
            from cmai_env.attacks.autoattack import run_chain

            images, broken_by = run_chain(task, batch, self._components(), self.eps, self.norm, generator, model=GenerativeClassifier(task))
            for name, count in broken_by.items():
                self.broken_by[name] = self.broken_by.get(name, 0) + count
            return AttackResult(dataclasses.replace(batch, images=images), self.modality)
        prompt = task.prompt_embeds(batch).detach()
        if self.name == "bridge_image_to_text":
            gain = _targeted(task, _wrong_classes(task, batch, self.target, generator))
            images = pgd_linf_ascent(
                lambda x: gain(task.lm_logits(x, prompt)), batch.images, self.eps, self.steps, self.step_size, self.random_start, generator
            )
            return AttackResult(dataclasses.replace(batch, images=images), self.modality)
        if self.name == "token_substitution":
            return AttackResult(dataclasses.replace(batch, tokens=self._hotflip(task, batch), token_embeds=None), self.modality)
        if self.name == "text_embedding_pgd":
            mask = _prompt_mask(batch, self.include_special)
            loss = lambda e: F.cross_entropy(task.lm_logits(batch.images, e), batch.labels, reduction="sum")  # noqa: E731
        else:  # bridge_text_to_image
            mask = _prompt_mask(batch, False)
            gain = _targeted(task, _wrong_classes(task, batch, self.target, generator))
            loss = lambda e: gain(task.lm_logits(batch.images, e))  # noqa: E731
        embeds = pgd_token_ascent(loss, prompt, mask, self.eps, self.steps, self.step_size, self.random_start, generator)
        return AttackResult(dataclasses.replace(batch, token_embeds=embeds), self.modality)

    def _hotflip(self, task: GenerativeTask, batch: PairBatch) -> torch.Tensor:
        """Greedy HotFlip over the LM vocabulary: ``ΔL(i, v) ≈ (e_v − e_{w_i})·∇_{e_i}L``, top ``verify_top`` re-scored.

        Same rule as :class:`~cmai_env.attacks.text.TokenSubstitution`, on the prompt's words
        with the (small, word-level) LM vocabulary minus the special tokens as candidates.
        """
        a, backbone = self, task.backbone
        tokens = batch.tokens.clone()
        editable = _prompt_mask(batch, False)
        table = backbone.lm.model.embed_tokens.weight.detach()
        candidates = torch.arange(4, table.shape[0], device=tokens.device)  # ids 0-3 are special
        if a.candidate_vocab is not None:
            candidates = candidates[: int(a.candidate_vocab)]
        rows = torch.arange(len(tokens), device=tokens.device)
        with torch.no_grad():
            latents = backbone.image_latents(batch.images)
        lm = lambda e: backbone.continuation_log_likelihoods(latents, e, task.cont_ids, task.cont_mask)  # noqa: E731
        for _ in range(int(a.k)):
            if not editable.any():
                break
            embeds = backbone.lm_token_embeddings(tokens).detach().requires_grad_(True)
            per_sample = F.cross_entropy(lm(embeds), batch.labels, reduction="none")
            (grad,) = torch.autograd.grad(per_sample.sum(), embeds)
            with torch.no_grad():
                gain = grad @ table[candidates].T - (grad * embeds).sum(-1, keepdim=True)  # (N, L, M)
                gain[tokens[..., None] == candidates] = -float("inf")
                gain[~editable] = -float("inf")
                top = min(int(a.verify_top), gain[0].numel())
                best_gain, flat = gain.flatten(1).topk(top, dim=-1)
                positions, choice = flat // len(candidates), candidates[flat % len(candidates)]
                losses = []
                for t in range(top):
                    trial = tokens.clone()
                    trial[rows, positions[:, t]] = choice[:, t]
                    losses.append(F.cross_entropy(lm(backbone.lm_token_embeddings(trial)), batch.labels, reduction="none"))
                loss = torch.stack(losses, 1).masked_fill(~torch.isfinite(best_gain), -float("inf"))
                best_loss, best = loss.max(-1)
                improve = best_loss > per_sample.detach()
                sel = rows[improve]
                tokens[sel, positions[sel, best[sel]]] = choice[sel, best[sel]]
                editable[sel, positions[sel, best[sel]]] = False
        return tokens


@functools.lru_cache(maxsize=None)
def _generative_class(cls: type[Attack]) -> type[Attack]:
    # Not registered: the registry keeps one class per name; this is a view of that class.
    return type(f"Generative{cls.__name__}", (GenerativeAttack, cls), {"__doc__": cls.__doc__})


def generative_attack(attack: Attack) -> Attack:
    """The same attack (class, parameters) adapted to :class:`GenerativeTask`.

    :raises ValueError: for attacks with no generative version (the message lists those that have one).
    """
    if attack.name not in GENERATIVE_ATTACKS:
        raise ValueError(
            f"attack {attack.name!r} has no generative version; attacks that apply to a generative backbone: {sorted(GENERATIVE_ATTACKS)}"
        )
    if isinstance(attack, GenerativeAttack):
        return attack
    params = {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack) if f.init}
    return _generative_class(type(attack))(**params)


__all__ = ["GenerativeAttack", "GenerativeClassifier", "GenerativeOutputs", "GenerativeTask", "generative_attack"]
