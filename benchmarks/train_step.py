"""Training-step time and peak memory: plain peft LoRA versus Bayesian-LoRA on the same modules.

Both variants train the same base model on the same batch (random token ids,
loss = next-token NLL at the last position, as in multiple-choice training);
Bayesian-LoRA adds one posterior draw per step and beta * KL / N_train.
Timed steps alternate between the two variants so that machine noise hits
both alike; the ratio is median(Bayesian) / median(plain).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the timed steps of
each variant; on CPU, the peak resident set size sampled every 2 ms while a
child process (one per variant, after building its model) runs the same
steps. Loading the model can peak higher than training (the GGUF default
dequantizes), so the lifetime peak would hide the difference.

    python benchmarks/train_step.py --model tiny
    python benchmarks/train_step.py --model smollm2-135m --batch-size 8 --seq-len 96

Last line: `time_ratio=<x> memory_ratio=<y>`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import psutil

import torch
from peft import LoraConfig, get_peft_model

import bayeslora

VARIANTS = ("lora", "bayeslora")


def load_base(name: str, device: str, dtype: torch.dtype):
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config).to(device=device, dtype=dtype)
    from bayeslora.models import load_model

    model, _ = load_model(name, dtype=dtype)
    return model.to(device)


def build(variant: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    base = load_base(args.model, args.device, getattr(torch, args.dtype))
    settings = dict(r=8, lora_alpha=16, target_modules=args.targets.split(","))
    if variant == "lora":
        model = get_peft_model(base, LoraConfig(**settings))
    else:
        model = bayeslora.get_bayeslora_model(base, bayeslora.BayesLoraConfig(**settings))
    model.train()
    # foreach: one fused update over all tensors (Bayesian factors have ~20 small tensors each)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    return model, optimizer


def make_batch(model, args) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator).to(args.device)
    return tokens[:, :-1], tokens[:, -1]


def train_step(variant: str, model, optimizer, inputs, targets, args) -> None:
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast):
        logits = model(input_ids=inputs, logits_to_keep=1).logits[:, -1].float()
    loss = torch.nn.functional.cross_entropy(logits, targets)
    if variant == "bayeslora":
        loss = loss + bayeslora.kl_divergence(model) / args.n_train
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_of_child(variant: str, args) -> float:
    """Peak resident memory (MiB) of a fresh process that builds `variant` and runs the timed steps."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_child_peak_rss, (variant, args))


def _child_peak_rss(variant: str, args) -> float:
    torch.set_num_threads(args.threads)
    model, optimizer = build(variant, args)
    inputs, targets = make_batch(model, args)
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample_rss() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    for _ in range(args.warmup + args.steps):
        train_step(variant, model, optimizer, inputs, targets, args)
    done.set()
    sampler.join()
    return peak[0] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random Llama), a Hub id, a folder or smollm2-135m")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=2000, help="N_train in beta * KL / N_train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast around the forward pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = {variant: build(variant, args) for variant in VARIANTS}
    batch = make_batch(runs["lora"][0], args)
    for variant, (model, optimizer) in runs.items():
        for _ in range(args.warmup):
            train_step(variant, model, optimizer, *batch, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = {variant: [] for variant in VARIANTS}
    peak = {}
    for _ in range(args.steps):
        for variant, (model, optimizer) in runs.items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            synchronize(args.device)
            start = time.perf_counter()
            train_step(variant, model, optimizer, *batch, args)
            synchronize(args.device)
            seconds[variant].append(time.perf_counter() - start)
            if args.device.startswith("cuda"):
                peak[variant] = max(peak.get(variant, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    if not args.device.startswith("cuda"):
        del runs
        peak = {variant: peak_rss_of_child(variant, args) for variant in VARIANTS}

    for variant in VARIANTS:
        print(f"{variant:>9}: median step {statistics.median(seconds[variant]) * 1000:8.1f} ms, "
              f"peak memory {peak[variant]:9.1f} MiB")
    time_ratio = statistics.median(seconds["bayeslora"]) / statistics.median(seconds["lora"])
    print(f"time_ratio={time_ratio:.3f} memory_ratio={peak['bayeslora'] / peak['lora']:.3f}")


if __name__ == "__main__":
    main()
