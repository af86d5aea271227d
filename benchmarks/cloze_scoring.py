"""Cloze scoring cost: shared-prompt key/value cache versus naive "one full sequence per choice" batching.

Both paths score the same questions with the same model and tokens in one run;
the last line reads `cost_ratio=<shared seconds / naive seconds> max_abs_diff=<largest |score difference|>`.

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
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    scorer = Scorer(tokenizer, "cloze")
    questions = load_task(args.task, args.split, limit=args.limit)
    batches = [scorer.collate(questions[start : start + args.batch_size]) for start in range(0, len(questions), args.batch_size)]

    seconds = {"shared": 0.0, "naive": 0.0}
    max_abs_diff, prompt_tokens, choice_tokens, naive_tokens = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in batches:
            start = time.perf_counter()
            shared = scorer.choice_logits(model, batch)
            seconds["shared"] += time.perf_counter() - start
            start = time.perf_counter()
            naive = scorer.naive_cloze_logits(model, batch)
            seconds["naive"] += time.perf_counter() - start
            finite = batch["choice_mask"]
            max_abs_diff = max(max_abs_diff, (shared[finite] - naive[finite]).abs().max().item())
            n_choices = finite.sum(-1)
            prompt_lengths = batch["prompt_mask"].sum(-1)
            choice_lengths = batch["choice_token_mask"].sum(-1).sum(-1)
            prompt_tokens += int(prompt_lengths.sum())
            choice_tokens += int(choice_lengths.sum())
            naive_tokens += int((prompt_lengths * n_choices).sum() + choice_lengths.sum())

    print(f"model={args.model} task={args.task}/{args.split} questions={len(questions)} batch_size={args.batch_size}")
    print(f"real tokens: shared={prompt_tokens + choice_tokens} naive={naive_tokens} "
          f"ratio={(prompt_tokens + choice_tokens) / naive_tokens:.3f}")
    print(f"seconds: shared={seconds['shared']:.2f} naive={seconds['naive']:.2f}")
    print(f"cost_ratio={seconds['shared'] / seconds['naive']:.3f} max_abs_diff={max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
