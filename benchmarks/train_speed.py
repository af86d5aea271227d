"""Optimizer steps per second of `bayeslora train` on SmolLM2-135M: plain LoRA vs Bayesian-LoRA.

    PYTHONPATH=. python benchmarks/train_speed.py --steps 6 --precisions bf16 fp32

For each (method, scoring, precision) it trains `--steps` optimizer steps of
batch 8 on ARC-Easy training questions through the real loop (`train.fit`,
LoRA r=8 on q_proj and v_proj, no validation set), reads the per-step wall
times from the run's train_log.jsonl, drops the first step (warm-up) and
prints steps/s = 1 / mean(seconds per step) with the Bayesian / plain ratio.
`mle` is plain peft LoRA; `bayeslora` adds the inducing-weight factors and
their KL. All configurations run one after the other in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from bayeslora.methods import get_method
from bayeslora.models import DEFAULT_MODEL, load_model
from bayeslora.scoring import Scorer
from bayeslora.tasks import load_task
from bayeslora.train import fit
from bayeslora.train_settings import TrainSettings


def steps_per_second(method_name: str, scoring: str, precision: str, steps: int, questions) -> float:
    model, tokenizer = load_model(DEFAULT_MODEL)
    method = get_method(method_name)
    set_seed(0)
    settings = TrainSettings(model=DEFAULT_MODEL, task="arc_easy", method=method_name, scoring=scoring, batch_size=8,
                             max_steps=steps, precision=precision, checkpoint_every=10**6, output="unused")
    lora = {"r": settings.r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
            "target_modules": list(settings.target_modules)}
    model = method.prepare(model, lora)
    with tempfile.TemporaryDirectory() as output:
        fit(model, Scorer(tokenizer, scoring), method, questions, [], dataclasses.replace(settings, output=output),
            Path(output), Accelerator(cpu=True))
        seconds = [json.loads(line)["seconds"] for line in (Path(output) / "train_log.jsonl").read_text().splitlines()]
    timed = seconds[1:]
    return len(timed) / sum(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--scorings", nargs="+", default=["letter", "cloze"])
    args = parser.parse_args()
    questions = load_task("arc_easy", "train")
    print("| scoring | precision | LoRA (mle) steps/s | Bayesian-LoRA steps/s | Bayesian / LoRA time |")
    print("|---|---|---|---|---|")
    for scoring in args.scorings:
        for precision in args.precisions:
            plain = steps_per_second("mle", scoring, precision, args.steps, questions)
            bayesian = steps_per_second("bayeslora", scoring, precision, args.steps, questions)
            print(f"| {scoring} | {precision} | {plain:.3f} | {bayesian:.3f} | x{plain / bayesian:.2f} |", flush=True)


if __name__ == "__main__":
    main()
