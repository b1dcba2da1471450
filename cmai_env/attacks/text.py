"""Attacks on the text modality: ``text_embedding_pgd`` (continuous) and ``token_substitution`` (discrete).

Both maximise the caption's zero-shot cross-entropy

    L(E) = CE(s · norm(g_t(E)) · Cᵀ, y)

where ``E = (e_1, …, e_L)`` are the caption's input token embeddings, ``g_t`` the text tower and
``C`` the class-prompt embeddings. Start-of-text, end-of-text and padding positions are never
edited by default: the end-of-text position is where the text tower pools, and padding sits
after it under the causal mask, so editing it changes nothing.

**Continuous** (``text_embedding_pgd``): PGD with an L2 budget *per token*,

    e_i ← e_i⁰ + Π_{‖δ_i‖₂≤ε_t}(δ_i + α · ∇_{e_i}L / ‖∇_{e_i}L‖₂)     for editable positions i.

On cmai-tiny the caption words' input embeddings have L2 norms 0.27–0.48 (median 0.32, mean
0.36 over the words of 1,000 shapes test captions; untrained vocabulary rows ≈ 0.16), so the
default ``ε_t = 0.2`` is about half a typical word's norm (measured ASR on 256 test captions with
10 steps: ≈ 0.86; ε_t = 0.1 gives ≈ 0.23 on 128). The result carries the perturbed
embeddings in ``PairBatch.token_embeds``.

**Discrete** (``token_substitution``, HotFlip, Ebrahimi et al. 2018): the first-order change of the
loss when position ``i``'s token ``w`` is swapped for vocabulary token ``v`` is

    ΔL(i, v) ≈ (e_v − e_w) · ∇_{e_i}L,

computed for all editable positions and candidate tokens by one matrix product; the top
``verify_top`` (position, token) pairs per caption are re-scored with the true loss and the best
is kept if it raises the loss. This repeats ``k`` times (greedy, a different position each time),
so at most ``k`` tokens change. The result carries real token ids (``token_embeds`` is None).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, register_attack
from cmai_env.attacks.image import normal_noise, uniform_noise
from cmai_env.models import Backbone

EmbedLossFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- masks
def token_masks(backbone: Backbone, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (N, L) masks ``(real, content)`` of a batch of token ids.

    ``real`` covers start-of-text through the first end-of-text token; ``content`` is ``real``
    without those two special positions (the words). A row without an end-of-text token (a
    truncated or hand-made sequence) ends where its largest id sits, which is where
    ``argmax`` pooling reads it.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    is_eot = tokens == backbone.eot_token_id
    end = torch.where(is_eot.any(-1), is_eot.int().argmax(-1), tokens.argmax(-1))
    real = positions[None, :] <= end[:, None]
    content = real & (positions[None, :] > 0) & (positions[None, :] < end[:, None])
    return real, content


def clean_token_embeddings(task: ZeroShotTask, batch: PairBatch) -> torch.Tensor:
    """The batch's input token embeddings: its perturbed ones if set, else ``embed(tokens)``."""
    if batch.token_embeds is not None:
        return batch.token_embeds.detach()
    with torch.no_grad():
        return task.backbone.token_embeddings(batch.tokens)


def text_ce_loss(task: ZeroShotTask, tokens: torch.Tensor, labels: torch.Tensor) -> EmbedLossFn:
    """``E ↦ Σᵢ CE(s·norm(g_t(Eᵢ))·Cᵀ, yᵢ)``: the caption's task loss from token embeddings, summed."""
    backbone = task.backbone
    return lambda embeds: F.cross_entropy(
        backbone.zero_shot_logits(backbone.encode_text_embeddings(embeds, tokens), task.class_embeds), labels, reduction="sum"
    )


# ---------------------------------------------------------------------------- continuous primitive
def project_per_token(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each token's ``δ_i`` (last dim) into ``‖δ_i‖₂ ≤ ε`` (in place)."""
    return delta.mul_((eps / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp_(max=1.0))


def pgd_token_ascent(
    loss_fn: EmbedLossFn,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``loss_fn(E⁰ + δ)`` with ``‖δ_i‖₂ ≤ ε`` per token and ``δ_i = 0`` outside ``mask``.

    ``δ_i ← Π(δ_i + α·g_i/‖g_i‖₂)`` with ``g = ∇_E loss``; the random start is a uniformly random
    direction per token with radius ``U(0, 1)·ε``.

    :param embeds: (N, L, W) clean input token embeddings ``E⁰``.
    :param mask: (N, L) bool, the positions that may move.
    :return: the perturbed embeddings (N, L, W), detached.
    """
    e0 = embeds.detach()
    keep = mask.unsqueeze(-1).to(e0.dtype)
    if random_start and eps > 0:
        delta = normal_noise(e0.shape, e0, generator)
        radius = uniform_noise(e0.shape[:2], e0, generator).unsqueeze(-1) * eps
        delta.mul_(radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mul_(keep)
    else:
        delta = torch.zeros_like(e0)
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(e0 + delta), delta)
        with torch.no_grad():
            grad.div_(grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mul_(keep)
            delta = project_per_token(delta.detach().add_(grad, alpha=step_size), eps)
    return (e0 + delta).detach()


# ---------------------------------------------------------------------------- attacks
@register_attack
@dataclass
class TextEmbeddingPGD(Attack):
    """Continuous PGD on the caption's input token embeddings (text-modality CE).

    ``e_i ← e_i⁰ + Π_{‖δ_i‖₂≤ε_t}(δ_i + α·g_i/‖g_i‖₂)`` on the word positions.

    :param eps: L2 budget ``ε_t`` per token (default 0.2 ≈ half the norm of a cmai-tiny word
        embedding, see the module docstring).
    :param steps: number of steps (default 10).
    :param step_size: ``α`` (default 0.05).
    :param random_start: start from a random point of each token's ball (default True).
    :param include_special: also perturb the start/end-of-text positions (default False).
    """

    name = "text_embedding_pgd"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        real, content = token_masks(task.backbone, batch.tokens)
        embeds = pgd_token_ascent(
            text_ce_loss(task, batch.tokens, batch.labels),
            clean_token_embeddings(task, batch),
            real if self.include_special else content,
            self.eps,
            self.steps,
            self.step_size,
            self.random_start,
            generator,
        )
        return AttackResult(PairBatch(batch.images, batch.tokens, batch.labels, embeds), self.modality)


@functools.lru_cache(maxsize=8)
def _word_final_ids(tokenizer) -> torch.Tensor | None:
    """Ids of vocabulary entries that end a word (``…</w>`` in CLIP's BPE), or None if unknown."""
    decoder = getattr(tokenizer, "decoder", None)
    if not isinstance(decoder, dict):
        return None
    return torch.tensor(sorted(i for i, piece in decoder.items() if piece.endswith("</w>")), dtype=torch.long)


def candidate_tokens(backbone: Backbone, candidate_vocab: int | None, whole_words: bool) -> torch.Tensor:
    """Vocabulary ids a substitution may insert (on the backbone's device).

    Special tokens (start/end of text, padding id 0) are excluded. With ``whole_words`` only
    word-final BPE pieces are kept, so a substitution replaces a word by a word. With
    ``candidate_vocab = M`` the M remaining tokens with the largest input-embedding norm are kept:
    rows the text tower was trained to use grow away from their small random initialisation
    (on cmai-tiny the 24 largest rows are exactly the words of the shapes captions).
    """
    weight = backbone.clip.token_embedding.weight
    allowed = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    special = {0, backbone.eot_token_id, *getattr(backbone.tokenizer, "all_special_ids", [])}
    sot = getattr(backbone.tokenizer, "sot_token_id", None)
    if sot is not None:
        special.add(int(sot))
    allowed[torch.tensor(sorted(special), device=weight.device)] = False
    if whole_words:
        words = _word_final_ids(backbone.tokenizer)
        if words is not None:
            word_mask = torch.zeros_like(allowed)
            word_mask[words.to(weight.device)] = True
            allowed &= word_mask
    ids = allowed.nonzero().squeeze(-1)
    if candidate_vocab is not None and candidate_vocab < len(ids):
        norms = weight.detach()[ids].norm(dim=-1)
        ids = ids[norms.topk(candidate_vocab).indices]
    return ids


@register_attack
@dataclass
class TokenSubstitution(Attack):
    """HotFlip-style greedy substitution of up to ``k`` word tokens (text-modality CE).

    Each of ``k`` rounds scores every (editable position ``i``, candidate ``v``) by
    ``ΔL ≈ (e_v − e_{w_i})·∇_{e_i}L``, re-evaluates the true loss of the ``verify_top`` best, and
    keeps the best one if it raises ``L``. Positions already changed are not edited again.

    :param k: at most this many tokens per caption change (default 1).
    :param candidate_vocab: restrict candidates to this many vocabulary tokens (largest
        embedding norm, see :func:`candidate_tokens`); None scores the whole vocabulary (default 1024).
    :param verify_top: candidate substitutions re-scored with the true loss per round (default 8).
    :param whole_words: insert only word-final BPE pieces (default True).
    """

    name = "token_substitution"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        tokens, _ = self._greedy(task, batch, int(self.k))
        return AttackResult(PairBatch(batch.images, tokens, batch.labels, None), self.modality)

    def replay_candidates(self, task: ZeroShotTask, batch: PairBatch, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions this attack's last greedy round ranks best: ``(tokens, valid)``, (N, T, L) and (N, T).

        The first ``k − 1`` rounds run as :meth:`perturb` runs them; the last round's ``T`` best
        first-order flips (``T = width``, default ``verify_top``) are returned instead of verified,
        each applied to the caption, best first (``valid`` False where a caption had fewer editable
        choices; ``k = 0``: T = 0). :meth:`perturb` keeps, of the first ``verify_top``, the one with
        the highest true loss if it beats the unchanged caption, so against the model these were
        ranked on, verifying those again gives :meth:`perturb`'s output. The embedding fidelity
        verifies them against its current adapters (``embedding_attack_radius: pixel_travel``,
        :mod:`cmai_env.fidelity.travel`): a caption attack does not depend on the image, so its
        candidates are computed once per caption.
        """
        n = batch.tokens.shape[0]
        if int(self.k) == 0:
            return batch.tokens.new_zeros((n, 0, batch.tokens.shape[1])), torch.zeros((n, 0), dtype=torch.bool, device=batch.tokens.device)
        vocab = self._vocab(task.backbone)
        tokens, editable = self._greedy(task, batch, int(self.k) - 1, vocab)
        _, positions, tokens_at = self._round(task, tokens, batch.labels, editable, vocab, width)
        return self._trials(tokens, positions, tokens_at)

    def _vocab(self, backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids a substitution may insert and their input embeddings (M,), (M, W) (:func:`candidate_tokens`)."""
        candidates = candidate_tokens(backbone, self.candidate_vocab, self.whole_words)
        return candidates, backbone.clip.token_embedding.weight.detach()[candidates]

    def _greedy(
        self, task: ZeroShotTask, batch: PairBatch, rounds: int, vocab: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rounds`` greedy substitutions: the new token ids and the positions still editable.

        :param vocab: :meth:`_vocab` when the caller already has it (computed here otherwise, once for all rounds).
        """
        vocab = vocab if vocab is not None else self._vocab(task.backbone)
        tokens = batch.tokens.clone()
        labels = batch.labels
        _, editable = token_masks(task.backbone, tokens)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        for _ in range(rounds):
            if not editable.any():
                break
            per_sample, positions, tokens_at = self._round(task, tokens, labels, editable, vocab)
            with torch.no_grad():
                best_loss, best_pos, best_tok = self._verify(task, tokens, labels, positions, tokens_at)
                improve = best_loss > per_sample
                sel = rows[improve]
                tokens[sel, best_pos[improve]] = best_tok[improve]
                editable[sel, best_pos[improve]] = False
        return tokens, editable

    def _round(
        self, task: ZeroShotTask, tokens: torch.Tensor, labels: torch.Tensor, editable: torch.Tensor,
        vocab: tuple[torch.Tensor, torch.Tensor], top: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round's first-order ranking over ``vocab`` (:meth:`_vocab`): each caption's current loss
        (N,) and its ``top`` (default ``verify_top``) best flips' positions and token ids (N, T) (:meth:`_top_flips`)."""
        backbone = task.backbone
        candidates, cand_embeds = vocab
        embeds = backbone.token_embeddings(tokens).detach().requires_grad_(True)
        with torch.enable_grad():
            per_sample = F.cross_entropy(
                backbone.zero_shot_logits(backbone.encode_text_embeddings(embeds, tokens), task.class_embeds), labels, reduction="none"
            )
            (grad,) = torch.autograd.grad(per_sample.sum(), embeds)
        with torch.no_grad():
            positions, tokens_at = self._top_flips(grad, embeds.detach(), tokens, editable, candidates, cand_embeds, top or int(self.verify_top))
        return per_sample.detach(), positions, tokens_at

    def _top_flips(
        self,
        grad: torch.Tensor,
        embeds: torch.Tensor,
        tokens: torch.Tensor,
        editable: torch.Tensor,
        candidates: torch.Tensor,
        cand_embeds: torch.Tensor,
        top: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) positions and token ids of each caption's ``T = top`` best first-order flips, best first.

        Invalid entries (fewer editable choices than T) have position −1.
        """
        n, length, _ = grad.shape
        top = min(top, len(candidates))
        where = editable.nonzero()  # (R, 2): (sample, position)
        g = grad[where[:, 0], where[:, 1]]  # (R, W)
        gain = g @ cand_embeds.T - (g * embeds[where[:, 0], where[:, 1]]).sum(-1, keepdim=True)  # (R, M)
        gain[candidates[None, :] == tokens[where[:, 0], where[:, 1]][:, None]] = -float("inf")
        row_gain, row_idx = gain.topk(top, dim=-1)  # best T tokens of each editable position
        table = grad.new_full((n, length, top), -float("inf"))
        table[where[:, 0], where[:, 1]] = row_gain
        ids = torch.zeros((n, length, top), dtype=torch.long, device=grad.device)
        ids[where[:, 0], where[:, 1]] = candidates[row_idx]
        flat_gain, flat_idx = table.view(n, -1).topk(top, dim=-1)  # best T over (position, token)
        positions = torch.div(flat_idx, top, rounding_mode="floor")
        tokens_at = ids.view(n, -1).gather(1, flat_idx)
        positions[~torch.isfinite(flat_gain)] = -1
        return positions, tokens_at

    @staticmethod
    def _trials(tokens: torch.Tensor, positions: torch.Tensor, tokens_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each proposed flip applied to its caption: (N, T, L) token ids and (N, T) validity (position ≥ 0)."""
        top = positions.shape[1]
        trial = tokens.unsqueeze(1).repeat(1, top, 1)  # (N, T, L)
        valid = positions >= 0
        s, t = valid.nonzero(as_tuple=True)
        trial[s, t, positions[s, t]] = tokens_at[s, t]
        return trial, valid

    @classmethod
    def _verify(
        cls, task: ZeroShotTask, tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, tokens_at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """True loss of each proposed flip; per caption the best (loss, position, token)."""
        n, top = positions.shape
        trial, valid = cls._trials(tokens, positions, tokens_at)
        logits = task.backbone.zero_shot_logits(task.backbone.encode_text(trial.view(n * top, -1)), task.class_embeds)
        loss = F.cross_entropy(logits, labels.repeat_interleave(top), reduction="none").view(n, top)
        loss[~valid] = -float("inf")
        best_loss, best = loss.max(dim=-1)
        rows = torch.arange(n, device=tokens.device)
        return best_loss, positions[rows, best].clamp_min(0), tokens_at[rows, best]
