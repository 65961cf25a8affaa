"""A real process group of one (gloo) and real DeepSpeed engines in it: what the trainer's
pieces call, tested without the deepspeed launcher."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from argument_classes import FinetuningArguments
from train.deepspeed_startup import (
    initialize_engine,
    quiet_harmless_warnings,
    skip_shm_all_reduce_build,
)


def process_group_of_one() -> None:
    """Makes this process rank 0 of a gloo group of 1, once per test process, and keeps it.

    DeepSpeed caches the groups it derives from the default group: engines built after a
    destroyed group was made again would use the dead ones. The group's store lives in this
    process (a HashStore), so it takes no port and sets no launcher variables that the
    subprocesses of other tests would inherit.
    """
    if dist.is_initialized():
        return
    quiet_harmless_warnings()
    skip_shm_all_reduce_build()  # as the trainer does: nothing to build on a first start
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def deepspeed_config(config: str, total_steps: int = 4) -> dict[str, Any]:
    """The trainer's DeepSpeed config from a shipped one, with a warmup of one step."""
    from train.run_finetuning import deepspeed_config as trainer_config

    arguments = FinetuningArguments(output_dir="unused", deepspeed=config, warmup_steps=1)
    return trainer_config(arguments, total_steps, accumulation=1, load_universal=False)


def engine_of(model: nn.Module, config: str = "zero2_fp32.json") -> tuple[Any, torch.dtype]:
    """`model` in a DeepSpeed engine built as the trainer builds it; its input dtype too.

    Call in the process group of one, with LOCAL_RANK set (DeepSpeed asks the environment for
    it, as a launcher would have set it).
    """
    return initialize_engine(model, deepspeed_config(config))
