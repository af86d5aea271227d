"""An lm-evaluation-harness model scored with the Bayesian-LoRA posterior predictive (extra `lm-eval`).

    python -m bayeslora.integrations.lm_eval run --model bayeslora \\
        --model_args pretrained=smollm2-135m,adapter=runs/default,samples=4 --tasks arc_easy

or from Python, after `import bayeslora.integrations.lm_eval` (which registers the name "bayeslora"):

    lm_eval.simple_evaluate(model="bayeslora", model_args="pretrained=...,adapter=...,samples=4", tasks=[...])

The model loads the base model (`bayeslora.models.load_model`: a Hub id, a local folder or
`smollm2-135m`) and the Bayesian-LoRA adapter (`bayeslora.load_bayeslora_model`), and answers
each `loglikelihood` request (context, continuation) with the posterior predictive:

    log p(continuation | context) = log (1/N) sum_s prod_t p_s(token_t | context, tokens_<t)

over N = `samples` posterior draws, draw s seeded with `seed + s` and held for every request, so
each multiple-choice question is scored by one mixture of the same N models. `is_greedy` asks
whether every continuation token is the most likely token of the draw-averaged next-token
distribution. The context is encoded with the tokenizer's special tokens and the continuation
without, separately, exactly as `bayeslora.scoring`'s cloze scorer does; with one draw a task's
`acc` is the cloze accuracy with sum normalisation. With several, lm-eval picks the choice whose
text is most probable under the mixture; `bayeslora evaluate` mixes each draw's softmax over the
choices instead, which lm-eval cannot do (it scores every continuation on its own).
Generation and rolling log-likelihood (perplexity) tasks are not supported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours: its registry loads them only when empty)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

import bayeslora
from bayeslora.errors import UsageError
from bayeslora.models import load_model
from bayeslora.predictive import log_mean_exp
from bayeslora.scoring import left_pad, positions


@register_model("bayeslora")
class BayesLoraLM(LM):
    def __init__(self, pretrained: str, adapter: str, samples: int = 4, seed: int = 0, batch_size: int | str = 8,
                 device: str | None = None, dtype: str = "fp32", trust_remote_code: bool = False) -> None:
        super().__init__()
        if not isinstance(samples, int) or samples < 1:
            raise UsageError(f"samples must be a positive integer, got {samples!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UsageError(f"batch_size must be a positive integer (no 'auto'), got {batch_size!r}")
        base, self.tokenizer = load_model(pretrained, dtype=dtype, trust_remote_code=trust_remote_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # lm-eval's default is cuda:0
            raise UsageError(f"device {device!r} asked for, but CUDA is not available: pass --device cpu")
        self.model = bayeslora.load_bayeslora_model(base, adapter).to(device).eval()
        self.samples, self.seed, self.batch_size = samples, seed, int(batch_size)
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [self._encode(*request.args) for request in requests]
        # batches of similar length waste less compute on padding; results go back in request order
        order = sorted(range(len(encoded)), key=lambda index: -sum(map(len, encoded[index])))
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        for start in tqdm(range(0, len(order), self.batch_size), desc="bayeslora loglikelihood", disable=disable_tqdm):
            indices = order[start : start + self.batch_size]
            for index, result in zip(indices, self._score([encoded[i] for i in indices])):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index].args, result)
        return results

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids); word-boundary spaces go with the continuation, as lm-eval expects."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        context_ids = self.tokenizer(stripped, add_special_tokens=True)["input_ids"]
        continuation_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not continuation_ids:
            raise UsageError(f"the continuation {continuation!r} encodes to no tokens")
        if not context_ids:  # an empty context: condition on the end-of-sequence token, as lm-eval's models do
            context_ids = [self.tokenizer.eos_token_id]
        return context_ids, continuation_ids

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Posterior-predictive log-likelihood and greedy flag of each (context, continuation) pair."""
        sequences = [(context + continuation)[:-1] for context, continuation in pairs]
        if self.max_length:  # keep the most recent tokens, as lm-eval's models do
            sequences = [sequence[-self.max_length :] for sequence in sequences]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids, attention_mask = (tensor.to(self.device) for tensor in left_pad(sequences, pad_id))
        width = max(len(continuation) for _, continuation in pairs)
        # continuation token t is predicted at position len - n + t of its left-padded row; rows padded to `width`
        targets = torch.zeros(len(pairs), width, dtype=torch.long, device=self.device)
        target_mask = torch.zeros(len(pairs), width, dtype=torch.bool, device=self.device)
        for row, (_, continuation) in enumerate(pairs):
            targets[row, width - len(continuation) :] = torch.tensor(continuation)
            target_mask[row, width - len(continuation) :] = True

        sequence_log_probs, summed_probs = [], 0.0
        with torch.no_grad():
            for sample in range(self.samples):
                with bayeslora.sampling(self.model, "sample", seed=self.seed + sample, hold=True):
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=positions(attention_mask)).logits
                log_probs = logits[:, -width:, :].float().log_softmax(-1)
                token_log_probs = log_probs.gather(2, targets[:, :, None]).squeeze(-1) * target_mask
                sequence_log_probs.append(token_log_probs.sum(-1))
                summed_probs = summed_probs + log_probs.exp()
        log_likelihoods = log_mean_exp(torch.stack(sequence_log_probs), dim=0)
        greedy = ((summed_probs.argmax(-1) == targets) | ~target_mask).all(-1)
        return [(value, flag) for value, flag in zip(log_likelihoods.tolist(), greedy.tolist())]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("the bayeslora lm-eval model answers loglikelihood requests "
                                  "(multiple-choice tasks) only, not rolling log-likelihood")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("the bayeslora lm-eval model answers loglikelihood requests "
                                  "(multiple-choice tasks) only, not generation")


def main() -> None:
    """lm-eval's command line with the "bayeslora" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
