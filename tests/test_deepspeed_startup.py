"""deepspeed.initialize's Muon check no longer imports torch's compiler stack."""

from __future__ import annotations

import subprocess
import sys

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
