"""The loop's CTC loss: padded 2-D targets and host lengths give the per-utterance sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.ctc_collator import LABEL_PAD
from train.run_finetuning import ctc_loss_sum


def test_padded_targets_sum_the_per_utterance_losses() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 12, dtype=torch.bfloat16)
    frames = torch.tensor([50, 31, 44])
    targets = [torch.randint(1, 12, (n,)) for n in (9, 4, 17)]
    labels = torch.full((3, 17), LABEL_PAD)
    for row, target in enumerate(targets):
        labels[row, : len(target)] = target
    target_lengths = torch.tensor([len(t) for t in targets])

    loss = ctc_loss_sum(logits, labels, frames, target_lengths, blank=0)

    assert loss.dtype == torch.float32
    # Reference: each utterance alone, unpadded, in fp32.
    expected = sum(
        F.ctc_loss(
            F.log_softmax(logits[row, : frames[row]].float(), -1)[:, None],
            target[None],
            frames[row : row + 1],
            target_lengths[row : row + 1],
            blank=0,
            reduction="sum",
        )
        for row, target in enumerate(targets)
    )
    torch.testing.assert_close(loss, expected)
