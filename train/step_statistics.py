"""Training statistics of one logging interval, summed without a host sync per micro-step, and
the metrics record logged for it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class StepStatistics:
    """Sums over a logging interval on this rank, all-reduced once when the interval is logged.

    What the device computes (the loss, and whether it is finite) stays on `device` and is added
    there, so a micro-step never waits for the GPU. What the host already knows from the
    collator (audio and batch counts) is added on the host. `all_reduce` moves the host part to
    the device and sums everything across ranks in one collective on `device`, which is what
    NCCL requires.
    """

    device: torch.device
    audio_seconds: float = 0.0
    padded_seconds: float = 0.0
    micro_batches: int = 0
    batch_checksum: int = 0
    loss_sum: torch.Tensor = field(init=False)
    loss_target_tokens: torch.Tensor = field(init=False)
    nonfinite_losses: torch.Tensor = field(init=False)

    HOST_FIELDS = ("audio_seconds", "padded_seconds", "micro_batches", "batch_checksum")
    DEVICE_FIELDS = ("loss_sum", "loss_target_tokens", "nonfinite_losses")

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches, self.batch_checksum = 0, 0
        self.audio_seconds, self.padded_seconds = 0.0, 0.0
        # float64: a checksum sum or a long interval's loss must not round.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_target_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.nonfinite_losses = torch.zeros((), dtype=torch.float64, device=self.device)

    def add_loss(self, loss_sum: torch.Tensor, target_tokens: int) -> None:
        """Adds a micro-batch's summed loss over its `target_tokens` (a host count).

        A non-finite loss is counted instead of summed, and its tokens are left out of the
        logged loss's denominator with it: the loss is the finite micro-batches' loss per
        token. Whether it is finite is known on the device only, so the tokens are selected
        there, without waiting for it.
        """
        loss = loss_sum.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_target_tokens += finite.to(torch.float64) * target_tokens
        self.nonfinite_losses += (~finite).to(torch.float64)

    def add_batch(self, audio_seconds: float, padded_seconds: float, checksum: int) -> None:
        """Adds what the collator knows about a micro-batch (host values, no device work)."""
        self.audio_seconds += audio_seconds
        self.padded_seconds += padded_seconds
        self.micro_batches += 1
        self.batch_checksum += checksum

    def all_reduce(self) -> torch.Tensor:
        """Every field summed over all ranks, as one float64 tensor on `device`, in field order.

        A collective: every rank calls it at the same step. Leaves this object unchanged.
        """
        host = [float(getattr(self, name)) for name in self.HOST_FIELDS]
        values = torch.cat(
            [
                torch.tensor(host, dtype=torch.float64).to(self.device, non_blocking=True),
                torch.stack([getattr(self, name) for name in self.DEVICE_FIELDS]),
            ]
        )
        dist.all_reduce(values)
        return values

    def reduce_and_reset(self) -> dict[str, float]:
        """The all-reduced fields by name (one host sync), then a fresh interval.

        Adds "loss": the summed finite losses over their target tokens, NaN for an interval
        whose every loss was non-finite (there is no loss to report, and 0 would look good).
        """
        values = self.all_reduce().tolist()
        self.reset()
        totals = dict(zip(self.HOST_FIELDS + self.DEVICE_FIELDS, values, strict=True))
        tokens = totals["loss_target_tokens"]
        totals["loss"] = totals["loss_sum"] / tokens if tokens else math.nan
        return totals


def interval_record(
    totals: dict[str, float],
    engine: Any,
    *,
    step: int,
    epoch: int,
    seconds: float,
    micro_batches_per_step: int,
    nonfinite_losses: int,
) -> dict[str, Any]:
    """The metrics record of a logging interval ending at `step`, from its all-reduced `totals`
    (`StepStatistics.reduce_and_reset`) and the engine's optimizer state.

    `seconds`: the interval's wall time, pauses for evaluation and checkpoints left out.
    `micro_batches_per_step`: over all ranks (world size x accumulation), which makes step_time
    the time per optimizer step. `nonfinite_losses` is the run's count so far, this interval's
    included.
    """
    record = {
        "step": step,
        "epoch": epoch,
        "loss": totals["loss"],
        "learning_rate": engine.get_lr()[0],
        "audio_seconds_per_second": totals["audio_seconds"] / seconds,
        "padding_fraction": 1 - totals["audio_seconds"] / totals["padded_seconds"],
        "step_time": seconds * micro_batches_per_step / totals["micro_batches"],
        "nonfinite_losses": nonfinite_losses,
        "skipped_steps": engine.skipped_steps,
        "grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "batch_checksum": int(totals["batch_checksum"]),
    }
    if engine.fp16_enabled():
        record["loss_scale"] = engine.optimizer.loss_scale
    if torch.cuda.is_available():  # the allocator's own count: no device sync
        record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record
