"""Cloze scoring cost: shared-prompt key/value cache versus naive "one full sequence per choice" batching.

Both paths score the same questions with the same model and tokens in one run;
the last line reads `cost_ratio=<shared CPU seconds / naive CPU seconds> max_abs_diff=<largest |score difference|>`.

Cost is this process's CPU time (`time.process_time`), which other processes on a
shared machine disturb far less than wall-clock time; one torch thread by default,
so that thread synchronisation does not count as work. Both paths are warmed up
on the first batch, and their order alternates from batch to batch.

    PYTHONPATH=. python benchmarks/cloze_scoring.py --model smollm2-135m --task arc_easy --split validation --limit 64
"""

from __future__ import annotations

import argparse
import time

import torch

from bayeslora.models import load_model
from bayeslora.scoring import Scorer
from bayeslora.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    scorer = Scorer(tokenizer, "cloze")
    questions = load_task(args.task, args.split, limit=args.limit)
    batches = [scorer.collate(questions[start : start + args.batch_size]) for start in range(0, len(questions), args.batch_size)]

    paths = {"shared": scorer.choice_logits, "naive": scorer.naive_cloze_logits}
    cpu_seconds = {name: 0.0 for name in paths}
    wall_seconds = {name: 0.0 for name in paths}
    max_abs_diff, prompt_tokens, choice_tokens, naive_tokens = 0.0, 0, 0, 0
    with torch.no_grad():
        for path in paths.values():
            path(model, batches[0])
        for number, batch in enumerate(batches):
            scores = {}
            for name in sorted(paths, reverse=number % 2 == 1):
                cpu, wall = time.process_time(), time.perf_counter()
                scores[name] = paths[name](model, batch)
                cpu_seconds[name] += time.process_time() - cpu
                wall_seconds[name] += time.perf_counter() - wall
            finite = batch["choice_mask"]
            max_abs_diff = max(max_abs_diff, (scores["shared"][finite] - scores["naive"][finite]).abs().max().item())
            n_choices = finite.sum(-1)
            prompt_lengths = batch["prompt_mask"].sum(-1)
            choice_lengths = batch["choice_token_mask"].sum(-1).sum(-1)
            prompt_tokens += int(prompt_lengths.sum())
            choice_tokens += int(choice_lengths.sum())
            naive_tokens += int((prompt_lengths * n_choices).sum() + choice_lengths.sum())

    print(f"model={args.model} task={args.task}/{args.split} questions={len(questions)} batch_size={args.batch_size}")
    print(f"real tokens: shared={prompt_tokens + choice_tokens} naive={naive_tokens} "
          f"ratio={(prompt_tokens + choice_tokens) / naive_tokens:.3f}")
    print(f"cpu seconds: shared={cpu_seconds['shared']:.2f} naive={cpu_seconds['naive']:.2f}; "
          f"wall seconds: shared={wall_seconds['shared']:.2f} naive={wall_seconds['naive']:.2f}")
    print(f"cost_ratio={cpu_seconds['shared'] / cpu_seconds['naive']:.3f} max_abs_diff={max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
