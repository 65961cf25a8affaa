"""DeepSpeed's startup compiles nothing the trainer does not call: no CPU shared-memory
all-reduce op on the first start, no torch compiler stack for deepspeed.initialize's Muon check;
and the ranks print none of the warnings that ask nothing of the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from espeak_audio import REPO_ROOT
from test_run_finetuning import (
    LAUNCHER,
    SCRIPT,
    assert_succeeded,
    free_port,
    training_args,
)

PROBE = """
import sys
from train.deepspeed_startup import import_muon_without_compiling
import_muon_without_compiling()
from deepspeed.runtime.zero.muon import original_muon
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # what DeepSpeed asks for
assert callable(original_muon.muon_update)
print("inductor" if "torch._inductor.compile_fx" in sys.modules else "no inductor")
"""


def run_probe(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return result.stdout.strip().splitlines()[-1]


def test_muon_check_imports_no_compiler_and_the_plain_import_does():
    assert run_probe(PROBE) == "no inductor"
    # Without the deferral the same check pulls in inductor: the test above can fail.
    assert run_probe(PROBE.replace("import_muon_without_compiling()", "")) == "inductor"


def test_first_cpu_start_compiles_nothing(prepared, tmp_path):
    """Two CPU ranks with an empty extensions directory, as after a fresh install. DeepSpeed
    used to build its shm all-reduce op there (half a minute of g++) and map a /dev/shm buffer
    per rank for it; a prebuilt op would map the buffers without building. Each rank used to
    warn about the scheduler and ZeRO's all-gather too."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    port = free_port()
    args = training_args(prepared, tmp_path / "run", "zero2_fp32.json", max_steps=1)
    command = [*LAUNCHER, "--num_gpus", "2", "--master_port", str(port), SCRIPT, *args]
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    assert_succeeded(result)
    assert [path.name for path in extensions.iterdir()] == []
    assert "before it has started" not in result.stdout + result.stderr
    assert "all_gather_into_tensor` is deprecated" not in result.stderr
    buffers = Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    assert list(buffers) == []
