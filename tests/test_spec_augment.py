"""Device-side SpecAugment: no host sync (proved on `meta`), HF statistics, and the installer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
from transformers.models.wav2vec2 import modeling_wav2vec2
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from train.spec_augment import install_device_spec_augment, max_spans, span_mask

META = torch.device("meta")


def tiny_config(**overrides: object) -> Wav2Vec2Config:
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "conv_dim": (32, 32),
        "conv_kernel": (3, 3),
        "conv_stride": (2, 2),
        "num_conv_pos_embeddings": 4,
        "num_conv_pos_embedding_groups": 2,
        "mask_time_prob": 0.5,
        "mask_time_length": 2,
    }
    return Wav2Vec2Config(**{**settings, **overrides})


def tiny_model(**overrides: object) -> Wav2Vec2ForCTC:
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(tiny_config(**overrides))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- no host sync --------------------------------------------------------------------------


def test_span_mask_runs_on_meta() -> None:
    lengths = torch.empty(4, dtype=torch.long, device=META)
    mask = span_mask(lengths, 50, mask_prob=0.5, mask_length=3, min_masks=2)
    assert mask.device == META
    assert mask.shape == (4, 50)
    assert mask.dtype == torch.bool


def test_installed_mask_hidden_states_runs_on_meta() -> None:
    model = tiny_model(mask_feature_prob=0.3, mask_feature_length=4).to(META).train()
    install_device_spec_augment(model)
    hidden = torch.empty(3, 20, 32, device=META)
    frames = torch.empty(3, 20, dtype=torch.bool, device=META)
    out = model.wav2vec2._mask_hidden_states(hidden, attention_mask=frames)
    assert out.shape == (3, 20, 32)
    assert out.device == META


def test_transformers_mask_hidden_states_syncs_so_meta_catches_it() -> None:
    """Counter-example: the stock method reads the lengths back to the host and fails on meta."""
    model = tiny_model().to(META).train()
    hidden = torch.empty(3, 20, 32, device=META)
    frames = torch.empty(3, 20, dtype=torch.bool, device=META)
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        model.wav2vec2._mask_hidden_states(hidden, attention_mask=frames)


def test_whole_forward_without_attention_mask_runs_on_meta() -> None:
    # With an attention mask, transformers' own encoder mask construction calls
    # `padding_mask.all()` (a sync outside SpecAugment), so only the unpadded forward can run here.
    model = tiny_model(mask_feature_prob=0.3, mask_feature_length=4).to(META).train()
    install_device_spec_augment(model)
    logits = model(torch.empty(2, 400, device=META)).logits
    assert logits.shape == (2, 99, model.config.vocab_size)


# --- span_mask semantics -------------------------------------------------------------------


def test_spans_never_pass_the_row_length() -> None:
    lengths = torch.tensor([100, 73, 40, 12, 5, 3, 0])
    for seed in range(50):
        mask = span_mask(lengths, 100, 0.65, 10, min_masks=2, generator=generator(seed))
        beyond = torch.arange(100) >= lengths[:, None]
        assert not mask[beyond].any()
        assert mask[0].any()


@pytest.mark.parametrize(
    ("total", "length", "prob", "span", "min_masks"),
    [
        (120, 100, 0.05, 10, 0),
        (60, 50, 0.5, 5, 0),
        (40, 30, 0.65, 10, 2),
        (20, 15, 0.9, 4, 0),
    ],
)
def test_statistics_match_transformers(
    total: int, length: int, prob: float, span: int, min_masks: int
) -> None:
    """Mean masked fraction and per-frame masking frequency agree with `_compute_mask_indices`."""
    calls, batch = 400, 5
    np.random.seed(0)
    padding = torch.zeros(batch, total, dtype=torch.long)
    padding[:, :length] = 1
    theirs = np.concatenate(
        [
            _compute_mask_indices((batch, total), prob, span, padding, min_masks)
            for _ in range(calls)
        ]
    )[:, :length]
    seeded = generator(0)
    lengths = torch.full((batch,), length)
    ours = torch.cat(
        [span_mask(lengths, total, prob, span, min_masks, seeded) for _ in range(calls)]
    ).numpy()
    assert not ours[:, length:].any()
    ours = ours[:, :length]

    # Rows of one call share their rounding epsilon, so compare per-call means.
    theirs_calls = theirs.reshape(calls, -1).mean(1)
    ours_calls = ours.reshape(calls, -1).mean(1)
    error = np.sqrt((theirs_calls.var() + ours_calls.var()) / calls)
    assert abs(theirs_calls.mean() - ours_calls.mean()) < 5 * error + 1e-3

    frequency_theirs, frequency_ours = theirs.mean(0), ours.mean(0)
    p = (frequency_theirs + frequency_ours) / 2
    # The shared epsilon correlates rows, so allow for an effective sample of `calls` rows.
    frame_error = np.sqrt(2 * p * (1 - p) / calls)
    assert np.all(np.abs(frequency_theirs - frequency_ours) <= 4 * frame_error + 0.01)


def test_min_masks_gives_exactly_that_many_single_frames() -> None:
    lengths = torch.tensor([10, 10, 7])
    for seed in range(20):
        mask = span_mask(lengths, 10, 0.0, mask_length=1, min_masks=3, generator=generator(seed))
        assert mask.sum(1).tolist() == [3, 3, 3]


def test_min_masks_is_capped_by_the_possible_starts() -> None:
    # Six frames hold three distinct starts of a 4-frame span: frames 0..5 are all masked.
    mask = span_mask(torch.tensor([6, 20]), 20, 0.0, 4, min_masks=10, generator=generator(1))
    assert mask[0, :6].all()
    assert not mask[0, 6:].any()
    # A full row takes at most total // mask_length = 5 spans, distinct starts: >= 8 frames.
    assert 8 <= int(mask[1].sum()) <= 20


def test_rows_shorter_than_the_span_stay_unmasked() -> None:
    lengths = torch.tensor([3, 0, 4, 50])
    for seed in range(20):
        mask = span_mask(lengths, 50, 0.9, 5, min_masks=2, generator=generator(seed))
        assert not mask[:3].any()
        assert mask[3].sum() >= 5
    # Transformers draws no span inside such rows either (it only pads with the last frame).
    attention = (torch.arange(50) < lengths[:, None]).long()
    theirs = _compute_mask_indices((4, 50), 0.9, 5, attention, min_masks=2)
    assert not theirs[0, :3].any() and not theirs[2, :4].any()


def test_span_longer_than_the_axis_is_rejected_like_transformers() -> None:
    with pytest.raises(ValueError, match="mask_length"):
        span_mask(torch.tensor([4]), 4, 0.5, 5)
    with pytest.raises(ValueError, match="mask_length"):
        _compute_mask_indices((1, 4), 0.5, 5)


def test_seeded_generator_is_deterministic() -> None:
    # Lengths whose expected span counts have every fractional part, so the rounding epsilon
    # as well as the starts must come from the generator for two draws to agree.
    lengths = torch.arange(50, 100)
    for seed in range(5):
        first = span_mask(lengths, 100, 0.5, 4, generator=generator(seed))
        again = span_mask(lengths, 100, 0.5, 4, generator=generator(seed))
        other = span_mask(lengths, 100, 0.5, 4, generator=generator(seed + 100))
        assert torch.equal(first, again)
        assert not torch.equal(first, other)


def test_max_spans_bounds_every_draw() -> None:
    for total, prob, span, min_masks in [(100, 0.65, 10, 2), (37, 0.3, 3, 0), (10, 0.0, 2, 9)]:
        bound = max_spans(total, prob, span, min_masks)
        for epsilon in np.linspace(0, 1, 50, endpoint=False):
            for length in range(span, total + 1):
                count = max(int(prob * length / span + epsilon), min_masks)
                if count * span > total:
                    count = total // span
                count = min(count, length - span + 1)
                assert count <= bound


# --- installed on a model ------------------------------------------------------------------


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    values = torch.randn(2, 400)
    attention = torch.ones(2, 400, dtype=torch.long)
    attention[1, 250:] = 0
    values[1, 250:] = 0
    return values, attention


class Probe:
    """Captures the feature projection's output and the encoder's input (the masked states)."""

    def __init__(self, model: Wav2Vec2ForCTC) -> None:
        self.projected: torch.Tensor | None = None
        self.encoded: torch.Tensor | None = None
        model.wav2vec2.feature_projection.register_forward_hook(self._projection)
        model.wav2vec2.encoder.register_forward_pre_hook(self._encoder)

    def _projection(self, module: object, args: object, output: tuple) -> None:
        self.projected = output[0].detach().clone()

    def _encoder(self, module: object, args: tuple) -> None:
        self.encoded = args[0].detach().clone()

    def masked_frames(self) -> torch.Tensor:
        assert self.projected is not None and self.encoded is not None
        return (self.projected != self.encoded).any(-1)


def test_installed_model_masks_real_frames_with_the_embedding(monkeypatch) -> None:
    def host_masks(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers' host-side _compute_mask_indices was called")

    monkeypatch.setattr(modeling_wav2vec2, "_compute_mask_indices", host_masks)
    model = tiny_model().train()
    install_device_spec_augment(model)
    probe = Probe(model)
    values, attention = ragged_batch()
    embed = model.wav2vec2.masked_spec_embed.detach()
    real = torch.tensor([99, 61])
    for _ in range(5):
        model(values, attention_mask=attention)
        masked = probe.masked_frames()
        assert masked[0].any() and masked[1].any()
        assert torch.equal(probe.encoded[masked], embed.expand(int(masked.sum()), -1))
        assert not (masked & (torch.arange(99) >= real[:, None])).any()


def test_eval_mode_masks_nothing() -> None:
    model = tiny_model().eval()
    install_device_spec_augment(model)
    probe = Probe(model)
    values, attention = ragged_batch()
    model(values, attention_mask=attention)
    assert not probe.masked_frames().any()


def test_apply_spec_augment_false_masks_nothing() -> None:
    model = tiny_model(apply_spec_augment=False, mask_feature_prob=0.5).train()
    install_device_spec_augment(model)
    probe = Probe(model)
    values, attention = ragged_batch()
    model(values, attention_mask=attention)
    assert not probe.masked_frames().any()


def test_explicit_mask_time_indices_match_transformers_even_in_eval() -> None:
    stock = tiny_model().eval()
    device = tiny_model().eval()
    install_device_spec_augment(device)
    values, attention = ragged_batch()
    indices = torch.zeros(2, 99, dtype=torch.bool)
    indices[0, 3:9] = True
    indices[1, 40:42] = True
    expected = stock.wav2vec2(values, attention_mask=attention, mask_time_indices=indices)
    got = device.wav2vec2(values, attention_mask=attention, mask_time_indices=indices)
    plain = device.wav2vec2(values, attention_mask=attention)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert not torch.equal(got.last_hidden_state, plain.last_hidden_state)


def test_explicit_mask_time_indices_replace_the_random_draw_in_training() -> None:
    stock = tiny_model().train()
    device = tiny_model().train()
    install_device_spec_augment(device)
    hidden = torch.randn(2, 30, 32)
    indices = torch.zeros(2, 30, dtype=torch.bool)
    indices[0, 3:9] = True
    indices[1, 20:22] = True
    frames = torch.ones(2, 30, dtype=torch.bool)
    expected = stock.wav2vec2._mask_hidden_states(hidden.clone(), indices, frames)
    got = device.wav2vec2._mask_hidden_states(hidden.clone(), indices, frames)
    assert torch.equal(got, expected)
    assert torch.equal((got != hidden).any(-1), indices)


def test_feature_masking_zeroes_whole_channels() -> None:
    model = tiny_model(mask_time_prob=0.0, mask_feature_prob=0.5, mask_feature_length=4).train()
    install_device_spec_augment(model, generator=generator(3))
    hidden = torch.randn(4, 20, 32)
    out = model.wav2vec2._mask_hidden_states(hidden.clone())
    zeroed = out == 0
    channels = zeroed.all(1)
    assert channels.any(1).all()
    assert torch.equal(zeroed, channels[:, None, :].expand_as(zeroed))
    assert torch.equal(out[~zeroed], hidden[~zeroed])


def test_loss_backward_reaches_the_mask_embedding() -> None:
    model = tiny_model().train()
    install_device_spec_augment(model)
    values, attention = ragged_batch()
    labels = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, -100, -100]])
    loss = model(values, attention_mask=attention, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.wav2vec2.masked_spec_embed.grad is not None
    assert model.wav2vec2.masked_spec_embed.grad.abs().sum() > 0
