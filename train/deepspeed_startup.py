"""Keeping ``deepspeed.initialize`` from compiling kernels that an AdamW run never calls.

To ask whether the optimizer is Muon, DeepSpeed imports its Muon module, whose kernels are
decorated with ``torch.compile`` at import time; building those wrappers imports
``torch._inductor``, most of ``deepspeed.initialize``'s time on a small model (measured with
cProfile: about 1 s of 1.2 s on an idle 2-core CPU). Importing the module first, with the
decoration deferred to the kernel's first call, keeps Muon compiled for runs that use it and
costs nothing to the others.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


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
