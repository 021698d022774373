"""GPT-SoVITS's GPT stage ("s1", ``Text2SemanticDecoder``), rebuilt for exact per-sample gradients.

A prefix language model over ``[phonemes ; semantic tokens]``: phoneme embeddings plus projected
BERT features, semantic-token embeddings, each with a sine position table scaled by a learnable
``alpha``; ``N`` post-norm transformer layers; a bias-free head over 1024 codes + EOS. Phoneme rows
attend to all real phonemes, semantic rows to all real phonemes and earlier semantic tokens.

What differs from the official module, and why (details in ``docs/models.md``):

* attention is four ``nn.Linear`` (``q/k/v/out_proj``) around ``F.scaled_dot_product_attention``
  and norms are ``nn.LayerNorm``, so Opacus's hooks see only native layers; the packed
  ``in_proj_weight`` is split and joined by ``shared.models.s1_checkpoint``;
* phonemes are left-padded and positions are counted per sample, so a sample's output does not
  depend on the padding of its batch;
* the loss of a sample sums cross-entropy over *its own* targets only (its tokens, then EOS).
  GPT-SoVITS also trains padded positions to emit EOS, which ties a sample's gradient to the
  longest sample in its batch and breaks DP-SGD's per-sample sensitivity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedvox.shared.errors import DataError
from fedvox.shared.models.batches import S1Batch
from fedvox.shared.models.config import S1Config
from fedvox.shared.models.dropout import Dropout, dropout

log = logging.getLogger(__name__)

EOS_BARRED_STEPS = 11
"""GPT-SoVITS's inference refuses EOS for the first 11 new tokens (about 0.4 s of speech)."""


def sine_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The sine position table ``[..., dim]`` at ``positions``: ``[sin, cos](position *
    10000^(-2i/dim))``, interleaved as in GPT-SoVITS, in float32 like GPT-SoVITS's."""
    exponent = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(exponent * (-math.log(10000.0) / dim))
    angles = positions.unsqueeze(-1).float() * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class SinePositionalEmbedding(nn.Module):
    """GPT-SoVITS's scaled sine embedding: ``alpha * table``, with the table (:func:`sine_table`)
    as the input.

    Positions differ per sample (left-padded phonemes start at a different column in every
    batch), so the caller computes the table once per distinct position and gathers it; the
    module owns no buffer. Taking the table as input also gives the per-sample gradient of
    ``alpha``, ``sum(table * grad_output)``, without recomputing it (the client's DP engine has a
    grad sampler for it); on the CPU the sines cost more than the layer's whole backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.alpha * table


class KVCache:
    """Keys and values of one layer, pre-allocated for ``max_len`` positions on the first call
    (in the dtype the projections produce, e.g. bf16 under autocast), so decoding never copies."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            batch, heads, _, head_dim = keys.shape
            self.keys = keys.new_empty(batch, heads, self.max_len, head_dim)
            self.values = values.new_empty(batch, heads, self.max_len, head_dim)
        end = self.length + keys.shape[2]
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``q/k/v/out_proj`` Linears around SDPA.

    With ``checkpoint`` set, only the parameter-free SDPA core is recomputed in backward: Opacus's
    hooks live on the Linears, which run once, so per-sample gradients stay exact (checkpointing
    a module with parameters would re-fire its hooks and break them).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.checkpoint = False
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # GPT-SoVITS initialises the packed [3*dim, dim] in-projection with xavier_uniform (so each
        # third uses fan_out = 3*dim) and zeroes the attention biases.
        bound = math.sqrt(6.0 / (4 * dim))
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.extend(k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.checkpoint and torch.is_grad_enabled():
            out = checkpoint(_attend, q, k, v, mask, dropout_p, use_reentrant=False)
        else:
            out = _attend(q, k, v, mask, dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """SDPA; with dropout on the CPU, the math path SDPA takes there, with the cheaper mask of
    :mod:`~fedvox.shared.models.dropout`."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:  # added in place: masked_fill is an unvectorised pass on the CPU
        scores.add_(mask if mask.is_floating_point() else attention_bias(mask))
    return dropout(scores.softmax(-1, dtype=q.dtype), dropout_p) @ v  # under autocast, in its dtype as SDPA's


def attention_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask as the bias ``_attend`` adds: 0 where attended, float32's most
    negative value elsewhere (its exponent underflows to 0 as ``-inf``'s does; no row is fully
    masked). Through ``uint8``: ``torch.where(mask, 0.0, -inf)`` took 0.67 ms on the CPU for
    s1 tiny's ``[8, 1, 190, 190]`` mask, this 0.04 ms."""
    return mask.view(torch.uint8).float().sub_(1).mul_(-torch.finfo(torch.float32).min)


class TransformerLayer(nn.Module):
    """Post-norm layer (GPT-SoVITS's ``norm_first=False``): attention, then a ReLU FFN."""

    def __init__(self, config: S1Config) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config.dim, config.heads, config.dropout)
        self.linear1 = nn.Linear(config.dim, config.ffn_dim)
        self.linear2 = nn.Linear(config.ffn_dim, config.dim)
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, mask, cache)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))


class TransformerEncoder(nn.Module):
    """The layer stack (``h`` in GPT-SoVITS; no final norm in the post-norm setting)."""

    def __init__(self, config: S1Config) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, caches: list[KVCache] | None = None) -> torch.Tensor:
        if mask is not None and self.training and self.dropout > 0 and x.device.type == "cpu":
            mask = attention_bias(mask)  # once per pass: every layer's attention adds it (_attend)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if caches is None else caches[i])
        return x


class Text2SemanticDecoder(nn.Module):
    """GPT-SoVITS s1: phonemes (+BERT features) and a semantic prefix -> next semantic token."""

    def __init__(self, config: S1Config, attention_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.bert_proj = nn.Linear(config.bert_dim, config.dim)
        self.ar_text_embedding = nn.Embedding(config.phoneme_vocab_size, config.dim)
        self.ar_text_position = SinePositionalEmbedding()
        self.ar_audio_embedding = nn.Embedding(config.semantic_vocab, config.dim)
        self.ar_audio_position = SinePositionalEmbedding()
        self.h = TransformerEncoder(config)
        self.ar_predict_layer = nn.Linear(config.dim, config.semantic_vocab, bias=False)
        self.dropout = Dropout(config.dropout)
        self.set_attention_checkpointing(attention_checkpointing)

    def set_attention_checkpointing(self, enabled: bool) -> None:
        """Recompute the attention core in backward (saves the ``[B, heads, S, S]`` activations)."""
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.checkpoint = enabled

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        phoneme_ids: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        bert_features: torch.Tensor,
        semantic_ids: torch.Tensor,
        semantic_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[B, Y + 1, 1025]``: row ``t`` predicts semantic token ``t``, row ``len`` EOS.

        Inputs follow :class:`~shared.models.batches.S1Batch`: phonemes left-padded to ``X``,
        semantic tokens right-padded to ``Y``. Row 0 comes from the last phoneme position.
        """
        width = phoneme_ids.shape[1]
        x = self.embed_phonemes(phoneme_ids, phoneme_lengths, bert_features)
        y = self.embed_semantic(semantic_ids, start=0)
        mask = prefix_lm_mask(phoneme_lengths, width, semantic_lengths, semantic_ids.shape[1])
        hidden = self.h(torch.cat([x, y], dim=1), mask)
        return self.ar_predict_layer(hidden[:, width - 1 :])

    def embed_phonemes(
        self, phoneme_ids: torch.Tensor, phoneme_lengths: torch.Tensor, bert_features: torch.Tensor
    ) -> torch.Tensor:
        """``[B, X, dim]`` phoneme inputs; position 0 is each sample's first real phoneme."""
        width = phoneme_ids.shape[1]
        columns = torch.arange(width, device=phoneme_ids.device)
        positions = (columns - (width - phoneme_lengths).unsqueeze(1)).clamp(min=0)
        table = F.embedding(positions, sine_table(columns, self.config.dim))  # positions < width
        x = self.ar_text_embedding(phoneme_ids) + self.bert_proj(bert_features)
        return self.dropout(x + self.ar_text_position(table))

    def embed_semantic(self, semantic_ids: torch.Tensor, start: int) -> torch.Tensor:
        """``[B, Y, dim]`` semantic inputs at positions ``start, start + 1, ...``."""
        batch, length = semantic_ids.shape
        positions = torch.arange(start, start + length, device=semantic_ids.device)
        table = sine_table(positions, self.config.dim).expand(batch, length, self.config.dim)
        return self.dropout(self.ar_audio_embedding(semantic_ids) + self.ar_audio_position(table))

    # ------------------------------------------------------------------ subset protocol
    def module_groups(self) -> dict[str, tuple[str, ...]]:
        layers = range(self.config.layers)
        return {
            "embeddings": (
                "bert_proj",
                "ar_text_embedding",
                "ar_text_position",
                "ar_audio_embedding",
                "ar_audio_position",
            ),
            "attention": tuple(f"h.layers.{i}.self_attn" for i in layers),
            "ffn": tuple(f"h.layers.{i}.{name}" for i in layers for name in ("linear1", "linear2")),
            "norms": tuple(f"h.layers.{i}.{name}" for i in layers for name in ("norm1", "norm2")),
            "head": ("ar_predict_layer",),
        }

    def lora_targets(self) -> tuple[str, ...]:
        return (r"h\.layers\.\d+\.self_attn\.(q|k|v|out)_proj", r"h\.layers\.\d+\.linear[12]")

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ()


def prefix_lm_mask(
    phoneme_lengths: torch.Tensor,
    phoneme_width: int,
    semantic_lengths: torch.Tensor,
    semantic_width: int,
) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, S, S]`` (True = may attend) over ``[phonemes ; semantic]``.

    Phoneme rows see every real phoneme; semantic row ``t`` sees every real phoneme and semantic
    tokens ``0..t``. Padded keys are hidden from every row, so no row is empty (each sample has at
    least one phoneme) and real rows never see padding.
    """
    device = phoneme_lengths.device
    total = phoneme_width + semantic_width
    rows = torch.arange(total, device=device)
    is_phoneme = rows < phoneme_width
    structure = is_phoneme.unsqueeze(0) | (~is_phoneme.unsqueeze(1) & (rows.unsqueeze(0) <= rows.unsqueeze(1)))
    phoneme_real = rows[:phoneme_width].unsqueeze(0) >= (phoneme_width - phoneme_lengths).unsqueeze(1)
    semantic_real = rows[:semantic_width].unsqueeze(0) < semantic_lengths.unsqueeze(1)
    key_real = torch.cat([phoneme_real, semantic_real], dim=1)
    return (structure.unsqueeze(0) & key_real.unsqueeze(1)).unsqueeze(1)


# ---------------------------------------------------------------------- loss
@dataclass
class S1Loss:
    """Per-sample loss for DP-SGD plus GPT-SoVITS's top-3 accuracy counts.

    ``per_sample[i]`` is the summed cross-entropy over sample ``i``'s targets (its semantic tokens,
    then EOS) and depends on sample ``i`` alone. ``top3_correct / top3_total`` is the official
    metric: top-3 accuracy over the batch's non-EOS targets.
    """

    per_sample: torch.Tensor  # float [B]
    tokens: torch.Tensor  # long [B]: targets per sample (semantic length + 1)
    top3_correct: torch.Tensor  # long scalar
    top3_total: torch.Tensor  # long scalar


def s1_targets(
    semantic_ids: torch.Tensor, semantic_lengths: torch.Tensor, eos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets [B, Y + 1], real [B, Y + 1])``: each sample's tokens, then EOS, then padding."""
    columns = torch.arange(semantic_ids.shape[1] + 1, device=semantic_ids.device)
    targets = F.pad(semantic_ids, (0, 1), value=eos)
    targets = torch.where(columns.unsqueeze(0) >= semantic_lengths.unsqueeze(1), eos, targets)
    return targets, columns.unsqueeze(0) <= semantic_lengths.unsqueeze(1)


def s1_loss(model: nn.Module, batch: S1Batch) -> S1Loss:
    """Run ``model`` (a :class:`Text2SemanticDecoder`, possibly wrapped by Opacus) on ``batch``."""
    logits = model(
        batch.phoneme_ids,
        batch.phoneme_lengths,
        batch.bert_features,
        batch.semantic_ids,
        batch.semantic_lengths,
    )
    eos = logits.shape[-1] - 1
    targets, real = s1_targets(batch.semantic_ids, batch.semantic_lengths, eos)
    full_precision = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # Over the contiguous last dimension: the class-second layout upstream passes (logits
    # transposed to [B, V, T]) costs two transposing copies and a strided log-softmax, 3.7x the
    # time of this on the CPU (13.0 against 3.5 ms at the tiny config's batch, forward and backward).
    token_ce = F.cross_entropy(full_precision.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    per_sample = token_ce.masked_fill(~real, 0.0).sum(dim=1)
    with torch.no_grad():
        # In the top 3 when fewer than 3 logits beat the target's (a tie counts for the target):
        # one comparison pass, 0.9 against topk's 1.9 ms at the tiny config's batch on the CPU.
        above = logits > logits.gather(-1, targets.unsqueeze(-1))
        hit = above.sum(dim=-1, dtype=torch.int32) < 3
        counted = real & (targets != eos)
        top3_correct = (hit & counted).sum()
    return S1Loss(per_sample, real.sum(dim=1), top3_correct, counted.sum())


# ---------------------------------------------------------------------- inference
@torch.inference_mode()
def generate(
    model: Text2SemanticDecoder,
    phoneme_ids: torch.Tensor,
    bert_features: torch.Tensor | None,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int | None = None,
    top_k: int | None = None,
    top_p: float = 1.0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.35,
    min_new_tokens: int = EOS_BARRED_STEPS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample semantic tokens for one utterance, as GPT-SoVITS's ``infer_panel`` does.

    ``phoneme_ids`` ``[X]`` are the reference text's phonemes followed by the target text's,
    ``bert_features`` ``[X, 1024]`` (``None``: zeros, as for non-Chinese text) and ``prompt_ids``
    ``[P]`` the reference audio's semantic tokens (may be empty). Returns the new tokens ``[N]``
    without the prompt and without EOS. Decoding stops when the sampled token or the most likely
    token after the repetition penalty is EOS, as upstream (never in the first ``min_new_tokens``) or after
    ``max_new_tokens`` (default: the
    config's ``max_sec`` of speech). ``top_k`` defaults to the config's official value.
    """
    config = model.config
    if phoneme_ids.ndim != 1 or phoneme_ids.numel() == 0:
        raise DataError(f"generate() needs a non-empty 1-D phoneme id tensor, got shape {tuple(phoneme_ids.shape)}")
    device = model.ar_predict_layer.weight.device
    max_new_tokens = config.max_semantic_tokens if max_new_tokens is None else max_new_tokens
    top_k = config.top_k if top_k is None else top_k
    phonemes = phoneme_ids.to(device).unsqueeze(0)
    prompt = prompt_ids.to(device=device, dtype=torch.long).unsqueeze(0)
    if bert_features is None:
        bert_features = torch.zeros(phoneme_ids.numel(), config.bert_dim)
    bert = bert_features.to(device=device, dtype=model.bert_proj.weight.dtype).unsqueeze(0)

    was_training = model.training
    model.eval()
    try:
        width, prefix = phonemes.shape[1], prompt.shape[1]
        lengths = torch.tensor([width], device=device)
        x = model.embed_phonemes(phonemes, lengths, bert)
        y = model.embed_semantic(prompt, start=0)
        mask = prefix_lm_mask(lengths, width, torch.tensor([prefix], device=device), prefix)
        caches = [KVCache(width + prefix + max_new_tokens) for _ in range(config.layers)]
        hidden = model.h(torch.cat([x, y], dim=1), mask, caches)
        history = prompt[0]
        new_tokens: list[int] = []
        for step in range(max_new_tokens):
            if step:  # feed the previous token, at semantic position prefix + step - 1
                step_input = model.embed_semantic(history[-1:].unsqueeze(0), start=prefix + step - 1)
                hidden = model.h(step_input, None, caches)
            logits = model.ar_predict_layer(hidden[0, -1]).float()
            if step < min_new_tokens:
                logits[config.eos] = -math.inf
            # upstream penalises its logits in place, so its EOS test sees the penalised ones
            logits = _penalise_repeats(logits, history, repetition_penalty)
            token = _sample(logits, top_k, top_p, temperature, generator)
            if token == config.eos or int(logits.argmax()) == config.eos:
                break
            new_tokens.append(token)
            history = torch.cat([history, history.new_tensor([token])])
        else:
            log.warning("s1 generation stopped at max_new_tokens=%d without EOS", max_new_tokens)
    finally:
        model.train(was_training)
    return torch.tensor(new_tokens, dtype=torch.long)


def _penalise_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` ``[V]`` with every token already in ``history`` (prompt included) made less likely.

    Positive logits are divided by ``penalty``, negative ones multiplied, as GPT-SoVITS does.
    """
    if penalty == 1.0 or not history.numel():
        return logits
    seen = logits[history]
    return logits.scatter(0, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def _sample(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    temperature: float,
    generator: torch.Generator | None,
) -> int:
    """One token from (already repetition-penalised) ``logits`` ``[V]``, filtered in GPT-SoVITS's order.

    Nucleus (top-p) filtering, temperature, top-k, then a multinomial draw from ``generator``.
    """
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        pivot = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < pivot, -math.inf)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


__all__ = [
    "EOS_BARRED_STEPS",
    "KVCache",
    "S1Loss",
    "SelfAttention",
    "SinePositionalEmbedding",
    "Text2SemanticDecoder",
    "TransformerEncoder",
    "TransformerLayer",
    "generate",
    "prefix_lm_mask",
    "s1_loss",
    "s1_targets",
    "sine_table",
]
