#!/usr/bin/env bash
# Builds gpu_wheels/ (git-ignored): the cp312 manylinux x86-64 wheels the GPU machine lacks to
# run `python -m benchmarks.gpu_validation`, for a machine with no package index.
#
# That machine has Python 3.12 with torch, transformers, accelerate, pyarrow, numpy, psutil,
# tqdm and tensorboard. Missing are the roots below and whatever they need beyond those:
#   deepspeed        the trainer (wheel built here: PyPI has only its sdist)
#   jiwer            train/evaluation.py
#   xxhash           preprocess/shard_format.py (shard checksums)
# (pytest is not among them: the machine's own pytest and plugins run tests/gpu.)
# Every wheel is the version installed here, so the GPU machine runs what was tested here.
# Install there with:
#   pip install --no-index --find-links gpu_wheels -r gpu_wheels/requirements.txt
#
#   bash benchmarks/gpu_wheels.sh [OUTPUT_DIR]     (default: gpu_wheels, at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
output=${1:-gpu_wheels}
max_mib=48  # a device run carries at most 64 MiB in all, the repository included

rm -rf "$output"
mkdir -p "$output"
# Pins the roots (requirements.txt, what the device installs) and lists for download everything
# they need that the GPU machine may lack: the installed metadata, walked with the device's
# environment markers, stopping at what that machine has.
python - "$output" <<'PYTHON'
import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ["deepspeed", "jiwer", "xxhash"]
ON_GPU_MACHINE = {
    canonicalize_name(name)
    for name in ("torch", "transformers", "accelerate", "pyarrow", "numpy", "psutil", "tqdm",
                 "tensorboard")
}
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}

needed, pending = {}, [canonicalize_name(root) for root in ROOTS]
while pending:
    name = pending.pop()
    if name in needed or name in ON_GPU_MACHINE:
        continue
    needed[name] = importlib.metadata.version(name)
    for line in importlib.metadata.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(MARKERS):
            pending.append(canonicalize_name(requirement.name))

output = sys.argv[1]
with open(f"{output}/requirements.txt", "w") as file:
    file.writelines(f"{root}=={needed[canonicalize_name(root)]}\n" for root in ROOTS)
with open(f"{output}/downloads.txt", "w") as file:
    file.writelines(
        f"{name}=={version}\n" for name, version in sorted(needed.items()) if name != "deepspeed"
    )
PYTHON

pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$output" -r "$output/downloads.txt"
rm "$output/downloads.txt"
pip wheel --quiet --no-deps --wheel-dir "$output" "$(grep '^deepspeed==' "$output/requirements.txt")"

ls -1 "$output"
size_kib=$(du -sk "$output" | cut -f1)
echo "$output: $(ls "$output"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB ($size_kib KiB)"
if ((size_kib > max_mib * 1024)); then
    echo "over ${max_mib} MiB" >&2
    exit 1
fi
