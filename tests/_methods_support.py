"""Stand-ins for the shared path, so the method tests depend on nothing but the methods.

`choice_logits` plays the scorer: the next-token logits at the last position,
restricted to four fixed "answer" token ids; a `n_choices` entry marks padded
choices with -inf like the real scorer. `toy_batches` is a learnable task: the
answer is the last input token modulo 4. `fit` is a minimal training loop with
the contract of the real one (AdamW with the method's weight decay, mean NLL +
regulariser, one run per member).
"""

from __future__ import annotations

import torch

from tests.conftest import make_tiny_llama

CHOICE_TOKENS = [5, 6, 7, 8]
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def choice_logits(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits[:, -1, CHOICE_TOKENS].float()
    if "n_choices" in batch:
        padded = torch.arange(len(CHOICE_TOKENS)) >= batch["n_choices"].view(-1, 1)
        logits = logits.masked_fill(padded, float("-inf"))
    return logits


def toy_batches(n_batches: int = 4, batch_size: int = 8, length: int = 6, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        input_ids = torch.randint(10, 128, (batch_size, length), generator=generator)
        batches.append({"input_ids": input_ids, "answers": input_ids[:, -1] % 4})
    return batches


def nll(model, batches) -> float:
    with torch.no_grad():
        logits = torch.cat([choice_logits(model, b) for b in batches])
        answers = torch.cat([b["answers"] for b in batches])
        return float(torch.nn.functional.cross_entropy(logits, answers))


def fit(method, batches, steps: int = 30, lr: float = 1e-2, seed: int = 0, model=None):
    """Prepare (unless `model` is given) and train `method` on `batches`; returns the peft model in eval mode."""
    torch.manual_seed(seed)
    model = model if model is not None else method.prepare(make_tiny_llama(seed), dict(LORA))
    n_train = sum(len(b["answers"]) for b in batches)
    for index, member in enumerate(method.members(model)):
        with member:
            torch.manual_seed(seed + index)
            params = [p for p in model.parameters() if p.requires_grad]
            optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=method.weight_decay)
            model.train()
            for step in range(steps):
                batch = batches[step % len(batches)]
                loss = torch.nn.functional.cross_entropy(choice_logits(model, batch), batch["answers"])
                extra = method.regulariser(model, n_train)
                if extra is not None:
                    loss = loss + extra
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    model.eval()
    return model


def draw_logits(method, model, batch, n_samples: int, seed: int = 0) -> list[torch.Tensor]:
    """Per-choice logits of `batch` under each predictive draw of `method`."""
    out = []
    with torch.no_grad():
        for context in method.draws(model, n_samples, seed):
            with context:
                out.append(choice_logits(model, batch))
    return out
