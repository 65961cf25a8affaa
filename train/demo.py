"""The whole pipeline on generated German speech, with nothing to download.

    python -m train.demo                      # 1 h corpus, about 10 minutes on 2 CPU cores
    python -m train.demo --hours 0.03 --max_steps 10     # smoke test

Generates a Common Voice-layout corpus with espeak-ng, preprocesses it with a local Ray
instance, fine-tunes the tiny random-init wav2vec2 through the deepspeed launcher (GPUs when
there are any, else CPU ranks over gloo), evaluates, exports, and transcribes a held-out test
clip with the exported model through transformers.pipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from train.free_port import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo", help="Where corpus, data and run go.")
    parser.add_argument("--hours", type=float, default=1.0, help="Hours of speech to generate.")
    parser.add_argument("--max_steps", type=int, default=750, help="Optimizer steps to train.")
    parser.add_argument("--eval_steps", type=int, default=250, help="Evaluate every N steps.")
    parser.add_argument(
        "--num_ranks", type=int, default=None, help="Training ranks (default: GPUs, else 2 CPUs)."
    )
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs for Ray (default all).")
    return parser.parse_args(argv)


def prepare_splits(corpus: Path, data: Path, num_cpus: int | None) -> None:
    import ray

    from argument_classes import ManifestArguments, PreprocessArguments
    from preprocess.prepare_dataset import prepare

    for split in ("train", "dev", "test"):
        summary = prepare(
            ManifestArguments(manifest=str(corpus / f"{split}.tsv")),
            PreprocessArguments(output_dir=str(data / split), num_cpus=num_cpus),
        )
        print(f"[demo] {split}: {summary.get('message') or summary['dataset']}")
    # Training needs the cores Ray's workers would otherwise keep.
    ray.shutdown()


def quiet_launcher_options() -> list[str]:
    """`--log_level error` where the deepspeed launcher has it (0.17.6 on): its info lines and its
    one warning, that it found no hostfile and runs on this machine, are all this demo wants."""
    from importlib.metadata import version

    from packaging.version import Version

    return ["--log_level", "error"] if Version(version("deepspeed")) >= Version("0.17.6") else []


def train(data: Path, run: Path, args: argparse.Namespace) -> None:
    import torch

    gpus = torch.cuda.device_count()
    num_ranks = args.num_ranks or gpus or min(2, os.cpu_count() or 1)
    config = "zero2_bf16.json" if gpus else "zero2_fp32.json"
    port = free_port()  # the launcher's default port may be taken by another job
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", *quiet_launcher_options(),
        "--num_accelerators", str(num_ranks), "--master_port", str(port),
        str(REPO_ROOT / "train" / "run_finetuning.py"),
        "--deepspeed", str(REPO_ROOT / "ds_configs" / config),
        "--train_dir", str(data / "train"), "--eval_dir", str(data / "dev"),
        "--model_name_or_path", "tiny",
        "--output_dir", str(run), "--max_steps", str(args.max_steps),
        "--eval_steps", str(args.eval_steps), "--save_steps", str(args.eval_steps),
        "--logging_steps", "50", "--learning_rate", "5e-3", "--warmup_steps", "100",
        "--max_batch_seconds", "30", "--dataloader_num_workers", "1",
    ]  # fmt: skip
    if (run / "checkpoints" / "latest").exists():
        command.append("--resume")
    environment = dict(os.environ)
    if not gpus:
        # DeepSpeed would choose the CPU too, each process warning that it found no GPU.
        environment["DS_ACCELERATOR"] = "cpu"
        print(f"[demo] no CUDA GPU: training on {num_ranks} CPU ranks over gloo", flush=True)
    print("[demo] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=environment)


def transcribe_test_clip(corpus: Path, run: Path) -> dict[str, str]:
    import soundfile
    import soxr
    import transformers

    with open(corpus / "test.tsv", encoding="utf-8", newline="") as file:
        row = next(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    recognizer = transformers.pipeline("automatic-speech-recognition", model=str(run / "model"))
    audio, rate = soundfile.read(corpus / "clips" / row["path"], dtype="float32")
    audio = soxr.resample(audio, rate, recognizer.feature_extractor.sampling_rate)
    return {"reference": row["sentence"], "transcript": recognizer(audio)["text"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    root = Path(args.output_dir).resolve()
    corpus, data, run = root / "corpus", root / "data", root / "run"
    if not (corpus / "test.tsv").exists():
        from train.demo_corpus import generate_corpus

        print(f"[demo] generating {args.hours} h of German speech in {corpus}", flush=True)
        generate_corpus(corpus, hours=args.hours)
    prepare_splits(corpus, data, args.num_cpus)
    train(data, run, args)
    result = transcribe_test_clip(corpus, run)
    evaluations = [
        record
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "eval_cer" in record
    ]
    last = evaluations[-1]
    print(
        f"[demo] dev CER {last['eval_cer']:.3f}, WER {last['eval_wer']:.3f} at step {last['step']}"
    )
    print(f"[demo] test clip reference:  {result['reference']}")
    print(f"[demo] test clip transcript: {result['transcript']}")
    print(f"[demo] model: {run / 'model'}; startup phases: {run / 'startup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
