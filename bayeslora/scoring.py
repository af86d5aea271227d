"""Per-choice logits of multiple-choice questions (questions x choices) from a causal LM.

Two modes behind one interface:

    scorer = Scorer(tokenizer, mode="letter")     # or mode="cloze"
    batch = scorer.collate(questions)
    logits = scorer.choice_logits(model, batch)    # [B, C_max] float32, differentiable; missing choices -inf

`letter` (the paper's protocol) shows the question with lettered choices and
reads the next-token logits of the label tokens A, B, C, ... at the last
prompt position; the softmax is over those labels only. Prompt, version
`letter-v1` (the context line only when the question has one):

    {context}
    Question: {question}
    A. {choice 0}
    B. {choice 1}
    Answer:

The label token is what the tokenizer produces for " A" right after "Answer:"
(byte-level BPE: "ĠA"; SentencePiece: "▁A"). Tokenizers that split the space
off as its own token get the space appended to the prompt instead and the bare
letter as label. Each label must be one token and the labels distinct, else a
`UsageError`.

`cloze` scores each choice text as a continuation of the prompt, version `cloze-v1`:

    {context}
    Question: {question}
    Answer:{" " + choice}

A choice's logit is its continuation log-likelihood, in nats: the mean over
its tokens (`normalization="mean"`, the default: long answers are not
penalised for their length) or the sum (`normalization="sum"`). The prompt is
encoded once per question and every choice is scored against its key/value
cache, so prompt tokens are computed once instead of once per choice
(benchmarks/cloze_scoring.py measures the saving against naive batching).
The prompt and the continuations are two forward passes: inside a held
posterior draw (`bayeslora.sampling(..., hold=True)`) both see the same draw,
and in every mode all choices of a question share both passes.

Prompt and continuation are tokenised separately and concatenated, so every
choice is scored on exactly the same prompt tokens.

Given the model's context (`max_length`), a question whose prompt plus longest
choice is longer is refused with its id and length; with `truncate_left` the
start of its prompt is dropped instead (never silently).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from bayeslora.errors import UsageError
from bayeslora.tasks import Question

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_CUE = "Answer:"
PROMPT_VERSIONS = {"letter": "letter-v1", "cloze": "cloze-v1"}
MODES = tuple(PROMPT_VERSIONS)
NORMALIZATIONS = ("mean", "sum")

Batch = dict[str, torch.Tensor]


def question_stem(question: Question) -> str:
    context = f"{question.context}\n" if question.context else ""
    return f"{context}Question: {question.question}\n"


def letter_prompt(question: Question) -> str:
    listed = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, question.choices))
    return question_stem(question) + listed + ANSWER_CUE


def cloze_prompt(question: Question) -> str:
    return question_stem(question) + ANSWER_CUE


def cloze_continuation(choice: str) -> str:
    return " " + choice


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def label_tokens(tokenizer: PreTrainedTokenizerBase, n_labels: int) -> tuple[str, list[int]]:
    """(text appended to the prompt after "Answer:", token id of each of the first `n_labels` letters).

    Tries " A" as one token after "Answer:" first, then "Answer: " + "A" for
    tokenizers that keep the space as a token of its own.
    """
    if n_labels > len(LETTERS):
        raise UsageError(f"{n_labels} choices; letter scoring supports at most {len(LETTERS)}")
    letters = LETTERS[:n_labels]
    for prompt_tail, separator in (("", " "), (" ", "")):
        cue = _encode(tokenizer, ANSWER_CUE + prompt_tail, special=False)
        ids = []
        for letter in letters:
            with_label = _encode(tokenizer, ANSWER_CUE + prompt_tail + separator + letter, special=False)
            if with_label[: len(cue)] != cue or len(with_label) != len(cue) + 1:
                break
            ids.append(with_label[-1])
        else:
            if len(set(ids)) != len(ids):
                raise UsageError(f"label tokens of {', '.join(letters)} are not distinct for this tokenizer: {ids}")
            return prompt_tail, ids
    raise UsageError(f"the labels {', '.join(letters)} are not single tokens after {ANSWER_CUE!r} for this tokenizer")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [N, max length], padded on the left."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence) :] = torch.tensor(sequence)
            mask[row, length - len(sequence) :] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Scorer:
    """Turns questions into model inputs (`collate`) and model outputs into per-choice logits."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mode: str = "letter",
        normalization: str = "mean",
        max_length: int | None = None,
        truncate_left: bool = False,
    ) -> None:
        """`max_length`: the model's context in tokens; a longer question (prompt + longest choice) is a
        `UsageError` naming it, or, with `truncate_left`, loses the start of its prompt. None: no limit."""
        self.check_settings(mode, normalization)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has neither a pad nor an end-of-sequence token to pad with")
        self.tokenizer = tokenizer
        self.mode = mode
        self.normalization = normalization
        self.max_length = max_length
        self.truncate_left = truncate_left
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @staticmethod
    def check_settings(mode: str, normalization: str) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown scoring mode {mode!r}; valid modes: {', '.join(MODES)}")
        if normalization not in NORMALIZATIONS:
            raise UsageError(f"unknown cloze normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")

    @property
    def prompt_version(self) -> str:
        version = PROMPT_VERSIONS[self.mode]
        return f"{version}-{self.normalization}" if self.mode == "cloze" else version

    def collate(self, questions: Sequence[Question]) -> Batch:
        if not questions:
            raise UsageError("cannot score an empty list of questions")
        batch = self._collate_letter(questions) if self.mode == "letter" else self._collate_cloze(questions)
        n_choices = torch.tensor([len(question.choices) for question in questions])
        batch["choice_mask"] = torch.arange(int(n_choices.max()))[None, :] < n_choices[:, None]
        batch["answers"] = torch.tensor([question.answer for question in questions], dtype=torch.long)
        return batch

    def check(self, questions: Sequence[Question]) -> None:
        """Tokenise every question as `collate` would, without building tensors: label tokens, empty
        choices and lengths fail here (a `UsageError`), before a model is loaded or anything is written."""
        if not questions:
            raise UsageError("cannot score an empty list of questions")
        if self.mode == "letter":
            prompt_tail, _ = label_tokens(self.tokenizer, max(len(question.choices) for question in questions))
            for question in questions:
                self._letter_tokens(question, prompt_tail)
        else:
            for question in questions:
                self._cloze_tokens(question)

    def _within_context(self, question: Question, prompt: list[int], continuation_length: int) -> list[int]:
        """The prompt's tokens, shortened from the left if asked, so that prompt + longest continuation fit."""
        total = len(prompt) + continuation_length
        if self.max_length is None or total <= self.max_length:
            return prompt
        if not self.truncate_left:
            raise UsageError(f"question {question.id!r} is {total} tokens (prompt + longest choice), longer than the "
                             f"model's context of {self.max_length}; shorten it, or truncate it from the left (--truncate-left)")
        keep = self.max_length - continuation_length
        if keep < 1:
            raise UsageError(f"question {question.id!r}: its longest choice alone is {continuation_length} tokens, "
                             f"which leaves no room for the prompt in the model's context of {self.max_length}")
        return prompt[len(prompt) - keep :]

    def _letter_tokens(self, question: Question, prompt_tail: str) -> list[int]:
        prompt = _encode(self.tokenizer, letter_prompt(question) + prompt_tail, special=True)
        return self._within_context(question, prompt, 0)

    def _cloze_tokens(self, question: Question) -> tuple[list[int], list[list[int]]]:
        continuations = [_encode(self.tokenizer, cloze_continuation(choice), special=False) for choice in question.choices]
        if any(len(tokens) == 0 for tokens in continuations):
            raise UsageError(f"question {question.id!r} has a choice that encodes to no tokens")
        prompt = _encode(self.tokenizer, cloze_prompt(question), special=True)
        return self._within_context(question, prompt, max(map(len, continuations))), continuations

    def _collate_letter(self, questions: Sequence[Question]) -> Batch:
        max_choices = max(len(question.choices) for question in questions)
        prompt_tail, label_ids = label_tokens(self.tokenizer, max_choices)
        prompts = [self._letter_tokens(question, prompt_tail) for question in questions]
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        labels = torch.tensor(label_ids, dtype=torch.long).expand(len(questions), max_choices).clone()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "label_ids": labels}

    def _collate_cloze(self, questions: Sequence[Question]) -> Batch:
        prompts, continuations = zip(*(self._cloze_tokens(question) for question in questions))
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        max_choices = max(len(encoded) for encoded in continuations)
        max_tokens = max(len(tokens) for encoded in continuations for tokens in encoded)
        choice_ids = torch.full((len(questions), max_choices, max_tokens), self.pad_id, dtype=torch.long)
        token_mask = torch.zeros((len(questions), max_choices, max_tokens), dtype=torch.long)
        for row, encoded in enumerate(continuations):
            for column, tokens in enumerate(encoded):
                choice_ids[row, column, : len(tokens)] = torch.tensor(tokens)
                token_mask[row, column, : len(tokens)] = 1
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "choice_ids": choice_ids, "choice_token_mask": token_mask}

    def choice_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-choice logits [B, C_max] in float32, differentiable; padded choices are -inf."""
        device = _model_device(model)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        logits = self._letter_logits(model, batch) if self.mode == "letter" else self._cloze_logits(model, batch)
        return logits.masked_fill(~batch["choice_mask"], float("-inf"))

    def _letter_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions(batch["attention_mask"]),
            logits_to_keep=1,
        )
        return output.logits[:, -1, :].float().gather(1, batch["label_ids"])

    def _cloze_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        prompt_mask, choice_ids, token_mask = batch["prompt_mask"], batch["choice_ids"], batch["choice_token_mask"]
        n_questions, n_choices, n_tokens = choice_ids.shape
        prompt = model(
            input_ids=batch["prompt_ids"],
            attention_mask=prompt_mask,
            position_ids=positions(prompt_mask),
            use_cache=True,
            logits_to_keep=1,
        )
        # the prompt's key/value cache, one copy per choice: [B * C, ...]
        # (transformers >= 5.2x calls it `cache`, earlier releases `past_key_values`)
        cache_name = "cache" if "cache" in prompt.keys() else "past_key_values"
        cache = prompt[cache_name]
        cache.batch_repeat_interleave(n_choices)
        flat_ids = choice_ids.reshape(n_questions * n_choices, n_tokens)
        flat_mask = token_mask.reshape(n_questions * n_choices, n_tokens)
        repeated_prompt_mask = prompt_mask.repeat_interleave(n_choices, dim=0)
        prompt_lengths = repeated_prompt_mask.sum(-1, keepdim=True)
        continuation = model(
            input_ids=flat_ids,
            attention_mask=torch.cat([repeated_prompt_mask, flat_mask], dim=1),
            position_ids=prompt_lengths + torch.arange(n_tokens, device=flat_ids.device),
            **{cache_name: cache},
        )
        # token t of a continuation is predicted at position t - 1; token 0 by the prompt's last position
        first = prompt.logits[:, -1, :].float().log_softmax(-1).repeat_interleave(n_choices, dim=0)
        first = first.gather(1, flat_ids[:, :1])
        rest = continuation.logits[:, :-1, :].float().log_softmax(-1).gather(2, flat_ids[:, 1:, None]).squeeze(-1)
        token_log_probs = torch.cat([first, rest], dim=1) * flat_mask
        return self._reduce(token_log_probs, flat_mask).reshape(n_questions, n_choices)

    def _reduce(self, token_log_probs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        summed = token_log_probs.sum(-1)
        if self.normalization == "sum":
            return summed
        return summed / token_mask.sum(-1).clamp(min=1)

    def naive_cloze_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Reference for `choice_logits` in cloze mode: one full prompt + choice sequence per choice.

        Same tokens, same positions, no cache sharing; benchmarks/cloze_scoring.py and the tests compare the two.
        """
        device = _model_device(model)
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        choice_ids, token_mask = batch["choice_ids"], batch["choice_token_mask"]
        n_questions, n_choices, n_tokens = choice_ids.shape
        sequences, prompt_lengths = [], []
        for row in range(n_questions):
            prompt = prompt_ids[row][prompt_mask[row].bool()].tolist()
            for column in range(n_choices):
                sequences.append(prompt + choice_ids[row, column][token_mask[row, column].bool()].tolist())
                prompt_lengths.append(len(prompt))
        input_ids, attention_mask = left_pad(sequences, self.pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
        log_probs = output.logits[:, :-1, :].float().log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(-1)
        # continuation tokens sit at the right end of each left-padded row
        flat_mask = token_mask.reshape(n_questions * n_choices, n_tokens).to(device)
        lengths = flat_mask.sum(-1)
        width = input_ids.shape[1]
        picked = torch.zeros(len(sequences), n_tokens, device=device)
        for index, length in enumerate(lengths.tolist()):
            if length:  # padded (missing) choices have no tokens
                picked[index, :length] = log_probs[index, width - 1 - length :]
        logits = self._reduce(picked, flat_mask).reshape(n_questions, n_choices)
        return logits.masked_fill(~batch["choice_mask"].to(device), float("-inf"))
