"""SpecAugment masks drawn on the hidden states' device, with no host synchronization.

Transformers' `Wav2Vec2Model._mask_hidden_states` draws its masks with numpy on the host: it
reads the frame lengths back with `.tolist()` and uploads the mask with `torch.tensor`, two
host<->device synchronizations in every training forward. `span_mask` draws the same spans with
torch ops on the lengths' device, sizing every tensor from host-known numbers only, and
`install_device_spec_augment` swaps it into a model per instance.
"""

from __future__ import annotations

import types

import torch
from transformers import Wav2Vec2ForCTC
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2Model


def max_spans(total: int, mask_prob: float, mask_length: int, min_masks: int = 0) -> int:
    """Host-side upper bound on the spans any row of `total` frames can get.

    It bounds the per-row count of `span_mask` for every epsilon in [0, 1) and every length up
    to `total`, so it can size the tensors without reading anything back from the device.
    """
    bound = max(int(mask_prob * total / mask_length) + 1, min_masks)
    return min(bound, total // mask_length)


def span_mask(
    lengths: torch.Tensor,
    total: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random SpecAugment spans, a (batch, total) bool mask on `lengths.device`.

    Follows transformers' `_compute_mask_indices`: one epsilon ~ U[0, 1) per call rounds
    `mask_prob * length / mask_length` probabilistically; the count is raised to `min_masks`,
    then capped to `total // mask_length` and to the `length - mask_length + 1` possible starts;
    distinct starts are drawn uniformly from [0, length - mask_length], so spans stay inside the
    row and may overlap. A row shorter than `mask_length` gets no span (transformers instead
    masks its last padded frame as filler, which is never a real frame). `lengths` (each at most
    `total`) stays on its device; `generator`, if given, must be on that device too.
    """
    if mask_length < 1:
        raise ValueError("`mask_length` has to be bigger than 0.")
    if mask_length > total:
        raise ValueError(
            f"`mask_length` has to be smaller than `sequence_length`, but got `mask_length`: "
            f"{mask_length} and `sequence_length`: {total}`"
        )
    device = lengths.device
    batch = lengths.shape[0]
    bound = max_spans(total, mask_prob, mask_length, min_masks)
    if bound == 0:
        return torch.zeros(batch, total, dtype=torch.bool, device=device)

    lengths = lengths.to(torch.long)
    epsilon = torch.rand((), generator=generator, dtype=torch.float64, device=device)
    # Same float64 arithmetic as transformers' Python floats: (prob * length) / span + epsilon.
    num_spans = torch.floor(lengths.to(torch.float64) * mask_prob / mask_length + epsilon)
    num_spans = num_spans.to(torch.long).clamp_min(min_masks)
    num_spans = torch.where(num_spans * mask_length > total, total // mask_length, num_spans)
    num_spans = torch.minimum(num_spans, (lengths - (mask_length - 1)).clamp_min(0))

    # Distinct uniform starts: the `bound` largest random keys among the row's valid starts.
    positions = torch.arange(total - mask_length + 1, device=device)
    keys = torch.rand(batch, positions.shape[0], generator=generator, device=device)
    keys = torch.where(positions <= (lengths - mask_length)[:, None], keys, -1.0)
    starts = keys.topk(bound, dim=-1).indices
    chosen = torch.arange(bound, device=device) < num_spans[:, None]
    # Spans not chosen go to a spare column past the end, dropped after the scatter.
    starts = torch.where(chosen, starts, total)
    offsets = torch.arange(mask_length, device=device)
    frames = (starts[:, :, None] + offsets).clamp_max(total).flatten(1)
    mask = torch.zeros(batch, total + 1, dtype=torch.bool, device=device)
    return mask.scatter_(1, frames, True)[:, :total]


def _device_mask_hidden_states(
    self: Wav2Vec2Model,
    hidden_states: torch.Tensor,
    mask_time_indices: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`Wav2Vec2Model._mask_hidden_states` with the masks drawn by `span_mask` on the device.

    `attention_mask` is the frame-level feature-vector mask transformers passes here, so its
    row sums are the frame lengths. Masks are applied with `torch.where`/`masked_fill` rather
    than boolean index assignment, which needs a `nonzero` and so a sync of its own.
    """
    if not getattr(self.config, "apply_spec_augment", True):
        return hidden_states
    batch, frames, hidden_size = hidden_states.shape
    device = hidden_states.device
    config = self.config

    if mask_time_indices is None and config.mask_time_prob > 0 and self.training:
        if attention_mask is not None:
            lengths = attention_mask.sum(-1)
        else:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
        mask_time_indices = span_mask(
            lengths,
            frames,
            config.mask_time_prob,
            config.mask_time_length,
            config.mask_time_min_masks,
            generator,
        )
    if mask_time_indices is not None:
        mask_time_indices = mask_time_indices.to(device=device, dtype=torch.bool)
        embed = self.masked_spec_embed.to(hidden_states.dtype)
        hidden_states = torch.where(mask_time_indices[:, :, None], embed, hidden_states)

    if config.mask_feature_prob > 0 and self.training:
        lengths = torch.full((batch,), hidden_size, dtype=torch.long, device=device)
        mask_feature_indices = span_mask(
            lengths,
            hidden_size,
            config.mask_feature_prob,
            config.mask_feature_length,
            config.mask_feature_min_masks,
            generator,
        )
        hidden_states = hidden_states.masked_fill(mask_feature_indices[:, None, :], 0)
    return hidden_states


def install_device_spec_augment(
    model: Wav2Vec2ForCTC, generator: torch.Generator | None = None
) -> None:
    """Replace `model.wav2vec2._mask_hidden_states` (this instance only) by the device version.

    Parameters, state dict and config are untouched; the model's config still decides the
    masking. `generator`, if given, must live on the device the model runs on; without one the
    device's default generator draws.
    """
    encoder_model = model.wav2vec2

    def mask_hidden_states(
        self: Wav2Vec2Model,
        hidden_states: torch.Tensor,
        mask_time_indices: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _device_mask_hidden_states(
            self, hidden_states, mask_time_indices, attention_mask, generator=generator
        )

    encoder_model._mask_hidden_states = types.MethodType(mask_hidden_states, encoder_model)
