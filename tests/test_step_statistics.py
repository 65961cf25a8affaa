"""StepStatistics: micro-steps stay on the device with no host sync; one collective, on it. And
the record an interval logs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from one_rank_group import process_group_of_one

from train.step_statistics import StepStatistics, interval_record


class RecordingAllReduce:
    """Stands in for dist.all_reduce and, like NCCL, rejects any tensor off `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor, *args, **kwargs) -> None:
        if tensor.device != self.device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        self.calls.append(tensor)


def test_recording_collective_rejects_host_tensors() -> None:
    # What the step loop used to all-reduce: a CPU tensor. Under NCCL that raises.
    with pytest.raises(RuntimeError, match="device type cpu"):
        RecordingAllReduce(torch.device("meta"))(torch.zeros(6, dtype=torch.float64))


def test_micro_steps_never_touch_the_host_and_reduce_once_on_the_device(monkeypatch) -> None:
    """On `meta` any host copy (.item(), .cpu(), .tolist()) raises, so this proves there is none."""
    device = torch.device("meta")
    recorder = RecordingAllReduce(device)
    monkeypatch.setattr(dist, "all_reduce", recorder)
    statistics = StepStatistics(device)
    for _ in range(3):
        statistics.add_loss(torch.empty((), device=device), target_tokens=7)
        statistics.add_batch(audio_seconds=1.5, padded_seconds=2.0, checksum=9)
    assert recorder.calls == []
    values = statistics.all_reduce()
    assert len(recorder.calls) == 1 and recorder.calls[0] is values
    assert values.device == device and values.dtype == torch.float64
    assert values.shape == (len(StepStatistics.HOST_FIELDS + StepStatistics.DEVICE_FIELDS),)


def test_nonfinite_losses_are_counted_not_summed() -> None:
    process_group_of_one()
    statistics = StepStatistics(torch.device("cpu"))
    for loss, tokens in ((2.0, 5), (math.nan, 7), (3.0, 11), (math.inf, 13)):
        statistics.add_loss(torch.tensor(loss, dtype=torch.float32), target_tokens=tokens)
        # crc32 checksums are up to 2**32: their sum must not round (float32 would).
        statistics.add_batch(audio_seconds=1.0, padded_seconds=1.25, checksum=2**32 - 3)
    totals = statistics.reduce_and_reset()
    assert totals == {
        "audio_seconds": 4.0,
        "padded_seconds": 5.0,
        "micro_batches": 4,
        "batch_checksum": 4 * (2**32 - 3),
        "loss_sum": 5.0,
        "loss_target_tokens": 16,
        "nonfinite_losses": 2,
        # The finite micro-batches' loss over their own tokens: 5 / 16, not 5 / 36, which
        # would shrink the logged loss by the skipped micro-batches' share of the tokens.
        "loss": 5.0 / 16,
    }
    # A fresh interval afterwards.
    assert statistics.reduce_and_reset()["micro_batches"] == 0


def test_an_interval_without_a_finite_loss_logs_nan_not_zero() -> None:
    process_group_of_one()
    statistics = StepStatistics(torch.device("cpu"))
    statistics.add_loss(torch.tensor(math.nan), target_tokens=9)
    totals = statistics.reduce_and_reset()
    assert totals["nonfinite_losses"] == 1 and totals["loss_target_tokens"] == 0
    assert math.isnan(totals["loss"])


class OptimizerState:
    """What interval_record asks a DeepSpeed engine, as an fp16 engine answers after 3 steps."""

    skipped_steps = 1
    optimizer = SimpleNamespace(loss_scale=1024.0)

    def get_lr(self) -> list[float]:
        return [5e-4]

    def get_global_grad_norm(self) -> float | None:
        return None  # a skipped step has none

    def fp16_enabled(self) -> bool:
        return True


def test_the_interval_record_is_per_step_and_per_audio_second() -> None:
    """Two steps of 2 ranks x 2 micro-batches in 4 s: 8 micro-batches, 2 s per step."""
    totals = {
        "loss": 0.75,
        "audio_seconds": 30.0,
        "padded_seconds": 40.0,
        "micro_batches": 8,
        "batch_checksum": 2.0**33 + 1,
        "nonfinite_losses": 1,
    }
    record = interval_record(
        totals, OptimizerState(), step=3, epoch=1, seconds=4.0, micro_batches_per_step=4,
        nonfinite_losses=2,
    )  # fmt: skip
    memory = {"max_memory_allocated_gib"} if torch.cuda.is_available() else set()
    assert set(record) - memory == {
        "step", "epoch", "loss", "learning_rate", "audio_seconds_per_second", "padding_fraction",
        "step_time", "nonfinite_losses", "skipped_steps", "grad_norm", "batch_checksum",
        "loss_scale",
    }  # fmt: skip
    assert (record["step"], record["epoch"], record["loss"]) == (3, 1, 0.75)
    assert record["learning_rate"] == 5e-4 and record["loss_scale"] == 1024.0
    assert record["audio_seconds_per_second"] == 7.5 and record["padding_fraction"] == 0.25
    assert record["step_time"] == 2.0
    # The run's count, not the interval's; the engine's skips; no norm reads as 0.
    assert (record["nonfinite_losses"], record["skipped_steps"], record["grad_norm"]) == (2, 1, 0.0)
    assert record["batch_checksum"] == 2**33 + 1 and isinstance(record["batch_checksum"], int)
