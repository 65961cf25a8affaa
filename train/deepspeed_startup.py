"""DeepSpeed's startup: the engine (`initialize_engine`), without what this trainer never calls
or needs to read.

On CPU, `deepspeed.init_distributed` JIT-builds a shared-memory all-reduce op with ninja and
g++ on the first start after an install (measured on a 2-core VM: 22 to 60 s of a 2-rank
start), for `deepspeed.comm.inference_all_reduce` alone: tensor-parallel inference layers call
it, ZeRO training reduces through torch.distributed. Loaded, it also leaves a 66 MB buffer per
rank in /dev/shm. DeepSpeed builds the op only where its table of compatible ops allows it, so
the trainer marks the op incompatible there before the process group starts.

To ask whether the optimizer is Muon, DeepSpeed imports its Muon module, whose kernels are
decorated with ``torch.compile`` at import time; building those wrappers imports
``torch._inductor``, most of ``deepspeed.initialize``'s time on a small model (measured with
cProfile: about 1 s of 1.2 s on an idle 2-core CPU). Importing the module first, with the
decoration deferred to the kernel's first call, keeps Muon compiled for runs that use it and
costs nothing to the others.

Two warnings that every rank prints at every start ask nothing of the user, and are dropped:
DeepSpeed's warmup schedulers ask themselves for their learning rate while they are built
(getting their starting one, which is right), and torch deprecates the collectives DeepSpeed's
ZeRO calls (only DeepSpeed can move; a removal would fail loudly, not silently).

Under ZeRO-3, transformers must know that the model is partitioned while it builds and runs it
(`zero3_model_config`).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"
SCHEDULER_NOT_STARTED = "Attempting to get learning rate from scheduler before it has started"
DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
)


def skip_shm_all_reduce_build() -> None:
    """Keeps `deepspeed.init_distributed` from building and loading DeepSpeed's CPU
    shared-memory all-reduce op, which only inference calls; call it before that."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's own test in comm/torch.py: only the CPU accelerator has a builder for the op.
    # Elsewhere the table is left unread, since its first read probes every op. DeepSpeed
    # keeps one table per process, so the entry holds until the process group starts.
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def quiet_harmless_warnings() -> None:
    """Drops the scheduler and deprecated-collective warnings of every start (see above)."""
    from deepspeed.utils import logger

    logger.addFilter(lambda record: record.getMessage() != SCHEDULER_NOT_STARTED)
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)


def _compile_on_first_call(function: Callable[..., Any]) -> Callable[..., Any]:
    compiled: Callable[..., Any] | None = None

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(function)
        return compiled(*args, **kwargs)

    return wrapper


def import_muon_without_compiling() -> None:
    """Imports DeepSpeed's Muon module with its torch.compile decorations made lazy."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    eager_compile = compiler.compile
    compiler.compile = lambda: _compile_on_first_call
    try:
        __import__(MUON_MODULE)
    except ImportError:  # an older DeepSpeed without Muon: nothing to defer
        pass
    finally:
        compiler.compile = eager_compile


def zero3_model_config(ds_config: dict[str, Any]) -> Any | None:
    """Under ZeRO-3, transformers' HfDeepSpeedConfig of `ds_config`; None under other stages.

    transformers holds it by weak reference and asks it whether ZeRO-3 is on while the model is
    built (weights are then created partitioned, and the weight-normed positional convolution is
    gathered right) and on every forward: the caller keeps it until the engine's last forward.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    # Imported only here: it pulls in accelerate, which other stages never use.
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def initialize_engine(model: nn.Module, ds_config: dict[str, Any]) -> tuple[Any, torch.dtype]:
    """`deepspeed.initialize` on `model`'s trainable parameters: the engine, and the dtype its
    inputs are cast to (the engine's bf16, fp16 or fp32).

    Frozen parameters get no optimizer state. fp32 engines on GPUs use TF32 tensor cores.
    """
    import deepspeed

    import_muon_without_compiling()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    input_dtype = (
        torch.bfloat16
        if engine.bfloat16_enabled()
        else torch.float16
        if engine.fp16_enabled()
        else torch.float32
    )
    if input_dtype == torch.float32 and torch.cuda.is_available():
        # TF32 tensor cores (Ampere and newer) for fp32 runs; no effect on older GPUs.
        torch.set_float32_matmul_precision("high")
    return engine, input_dtype
