"""Building the Wav2Vec2ForCTC to fine-tune, its processor, and rank-synchronized layerdrop.

Presets build random-init models from a config alone (nothing downloads): `tiny` for the demo
and tests, `base` and `large` with the published architectures for throughput benchmarks.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

import torch
from torch import nn
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)

from argument_classes import ModelArguments
from preprocess.text_normalization import PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER
from train.spec_augment import install_device_spec_augment

PRESETS: dict[str, dict[str, Any]] = {
    # Four convolutions with the usual 320x downsampling (20 ms frames) instead of seven: the
    # random-init encoder has to train, and on CPUs its backward dominates the step.
    "tiny": {
        "hidden_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "conv_dim": (32, 64, 64, 64),
        "conv_kernel": (10, 4, 4, 4),
        "conv_stride": (5, 4, 4, 4),
        # No dropout: a model this small underfits in a demo's few hundred steps.
        "activation_dropout": 0.0,
        "final_dropout": 0.0,
        "num_conv_pos_embeddings": 32,
        "num_conv_pos_embedding_groups": 4,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
    },
    "base": {},  # Wav2Vec2Config's defaults are wav2vec2-base.
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
    },
}


class ModelSetupError(ValueError):
    """The model and the dataset do not fit together; one line for the user."""


def _random_init_config(name_or_path: str) -> dict[str, Any] | None:
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as file:
            return json.load(file)
    return None


def build_model(
    model_args: ModelArguments, vocab: dict[str, int], sampling_rate: int
) -> Wav2Vec2ForCTC:
    """A CTC model whose head has one output per vocabulary entry, [PAD] being the blank.

    Call with transformers' HfDeepSpeedConfig alive under ZeRO-3, so weights are created
    partitioned (zero.Init) and the weight-normed positional convolution is gathered correctly.
    """
    overrides = {
        "vocab_size": len(vocab),
        "pad_token_id": vocab[PAD_TOKEN],
        "ctc_zero_infinity": True,
        "ctc_loss_reduction": "sum",
        # Layerdrop is applied by SyncedLayerDrop, identically on every rank.
        "layerdrop": 0.0,
        "mask_time_prob": model_args.mask_time_prob,
        "hidden_dropout": model_args.hidden_dropout,
        "attention_dropout": model_args.attention_dropout,
    }
    config_dict = _random_init_config(model_args.model_name_or_path)
    if config_dict is not None:
        # Built whole, not under zero.Init: transformers' ZeRO-3 initialization skips the
        # positional conv's weight-norm parameters (they sit two modules down) and leaves them
        # uninitialized or crashes. deepspeed.initialize partitions the model right after;
        # random-init models are benchmark and test sizes, so a whole copy per rank is fine.
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**{**config_dict, **overrides}))
    else:
        _check_pretrained_fits(model_args.model_name_or_path, vocab, sampling_rate)
        model = Wav2Vec2ForCTC.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=True, **overrides
        )
    pretrained = config_dict is None
    freeze = (
        pretrained
        if model_args.freeze_feature_encoder is None
        else model_args.freeze_feature_encoder
    )
    if freeze:
        model.freeze_feature_encoder()
    if model_args.layerdrop > 0:
        SyncedLayerDrop.install(model, model_args.layerdrop)
    # SpecAugment masks drawn on the device: transformers draws them on the host, which costs
    # two host syncs per training forward.
    install_device_spec_augment(model)
    return model


def _check_pretrained_fits(name_or_path: str, vocab: dict[str, int], sampling_rate: int) -> None:
    """A fine-tuned head trained on another vocabulary must not be silently re-initialized."""
    if not os.path.isdir(name_or_path):
        return
    vocab_file = os.path.join(name_or_path, "vocab.json")
    if os.path.isfile(vocab_file):
        with open(vocab_file, encoding="utf-8") as file:
            model_vocab = json.load(file)
        if model_vocab != vocab:
            raise ModelSetupError(
                f"{name_or_path} has a CTC head for another vocabulary ({len(model_vocab)} "
                f"symbols) than the training data ({len(vocab)}); start from a model without a "
                "CTC head or rebuild the datasets with the model's vocabulary"
            )
    extractor_file = os.path.join(name_or_path, "preprocessor_config.json")
    if os.path.isfile(extractor_file):
        with open(extractor_file, encoding="utf-8") as file:
            model_rate = json.load(file).get("sampling_rate", sampling_rate)
        if model_rate != sampling_rate:
            raise ModelSetupError(
                f"{name_or_path} expects {model_rate} Hz audio, the dataset has {sampling_rate} Hz"
            )


def build_processor(
    model_args: ModelArguments, vocab_file: str, sampling_rate: int
) -> Wav2Vec2Processor:
    """Feature extractor (the pretrained model's own when it has one) and a CTC tokenizer."""
    extractor_dir = model_args.model_name_or_path
    if os.path.isfile(os.path.join(extractor_dir, "preprocessor_config.json")):
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(extractor_dir)
    else:
        feature_extractor = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=sampling_rate,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        )
    tokenizer = Wav2Vec2CTCTokenizer(
        vocab_file, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, word_delimiter_token=WORD_DELIMITER
    )
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


class SyncedLayerDrop:
    """Layerdrop whose skip decisions are the same on every rank.

    Transformers draws layerdrop from each rank's global RNG, so ranks skip different layers:
    under ZeRO-1/2 their gradient reductions then disagree and the collectives hang or abort.
    Here one generator, reseeded from (seed, step) on every rank alike, decides for all ranks.
    The layers' `forward` is replaced per instance, so parameter names and checkpoints are
    unchanged, and ZeRO-3's gather hooks still run for a skipped layer, keeping ranks in step.
    """

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.generator = torch.Generator()
        self.skipped = 0

    @classmethod
    def install(cls, model: Wav2Vec2ForCTC, probability: float) -> SyncedLayerDrop:
        layerdrop = cls(probability)
        for layer in model.wav2vec2.encoder.layers:
            layer.forward = types.MethodType(layerdrop._wrap(layer.forward), layer)
        model.synced_layerdrop = layerdrop
        return layerdrop

    def reseed(self, seed: int, step: int, micro_step: int) -> None:
        self.generator.manual_seed(hash((seed, step, micro_step)) & 0x7FFF_FFFF_FFFF_FFFF)

    def _wrap(self, forward: Any) -> Any:
        def synced_forward(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
            draw = torch.rand((), generator=self.generator).item()
            if layer.training and draw < self.probability:
                self.skipped += 1
                return hidden_states
            return forward(hidden_states, *args, **kwargs)

        return synced_forward
