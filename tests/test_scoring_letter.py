"""Letter scoring: label tokens, prompt, last-position logits, padding, gradients."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bayeslora.errors import UsageError
from bayeslora.scoring import Scorer, label_tokens, letter_prompt
from bayeslora.tasks import load_task_file
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

FIXTURE = "bayeslora/tasks/fixtures/questions.jsonl"


def byte_level_tokenizer(merged_labels: bool) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: every byte a token, plus "ĠA".."ĠE" merges when `merged_labels`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(sorted(alphabet))}
    merges = []
    if merged_labels:
        for letter in "ABCDE":
            vocab["Ġ" + letter] = len(vocab)
            merges.append(("Ġ", letter))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="!", pad_token="!")


def test_space_prefixed_label_tokens_are_used_when_single():
    tokenizer = byte_level_tokenizer(merged_labels=True)
    tail, ids = label_tokens(tokenizer, 4)
    assert tail == "" and ids == tokenizer.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])


def test_tokenizer_with_a_separate_space_token_gets_the_space_in_the_prompt():
    tokenizer = byte_level_tokenizer(merged_labels=False)
    tail, ids = label_tokens(tokenizer, 3)
    assert tail == " " and ids == tokenizer.convert_tokens_to_ids(["A", "B", "C"])
    scorer = Scorer(tokenizer, "letter")
    question = load_task_file(FIXTURE)[1]
    batch = scorer.collate([question])
    assert tokenizer.decode(batch["input_ids"][0]) == letter_prompt(question) + " "


def test_labels_that_are_not_distinct_tokens_are_refused():
    tokenizer = make_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    del vocab["C"]  # "C" and "D" now both map to [UNK]
    del vocab["D"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    clashing = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    assert label_tokens(clashing, 2)[1] == clashing.convert_tokens_to_ids(["A", "B"])
    with pytest.raises(UsageError, match="not distinct"):
        label_tokens(clashing, 4)


def test_labels_that_are_not_single_tokens_are_refused():
    tokenizer = make_tiny_tokenizer()
    backend = Tokenizer(models.WordLevel(tokenizer.get_vocab(), unk_token="[UNK]"))
    backend.normalizer = normalizers.Replace("B", "B B")  # "B" always becomes two tokens
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    splitting = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(UsageError, match="not single tokens"):
        label_tokens(splitting, 2)


def test_prompt_text_is_the_documented_template():
    question = load_task_file(FIXTURE)[5]
    assert letter_prompt(question) == (
        "Rain falls when water drops in clouds grow heavy.\n"
        "Question: does rain come from clouds?\nA. yes\nB. no\nAnswer:"
    )


def test_batched_logits_equal_unpadded_single_forward_passes():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    questions = load_task_file(FIXTURE)
    scorer = Scorer(tokenizer, "letter")
    with torch.no_grad():
        logits = scorer.choice_logits(model, scorer.collate(questions))
        for row, question in enumerate(questions):
            ids = tokenizer(letter_prompt(question), return_tensors="pt").input_ids
            last = model(input_ids=ids).logits[0, -1]
            labels = tokenizer.convert_tokens_to_ids(list("ABCDE"[: len(question.choices)]))
            torch.testing.assert_close(logits[row, : len(question.choices)], last[labels], atol=1e-5, rtol=1e-5)
            assert torch.isneginf(logits[row, len(question.choices) :]).all()
    assert logits.dtype == torch.float32 and logits.shape == (8, 5)


def test_logits_are_differentiable_and_answers_collated():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    questions = load_task_file(FIXTURE)
    scorer = Scorer(tokenizer, "letter")
    batch = scorer.collate(questions)
    assert batch["answers"].tolist() == [question.answer for question in questions]
    loss = torch.nn.functional.cross_entropy(scorer.choice_logits(model, batch), batch["answers"])
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_bad_mode_and_empty_batch_are_refused():
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(UsageError, match="unknown scoring mode 'letters'"):
        Scorer(tokenizer, "letters")
    with pytest.raises(UsageError, match="empty"):
        Scorer(tokenizer, "letter").collate([])
