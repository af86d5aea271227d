"""The one training loop, for every method (`experiment.run_experiment` sets up a run around it).

Per optimizer step, over a global batch of `batch_size` questions split across
processes and accumulation micro-batches:

    loss = mean NLL(answer | question)  +  w(step) * method.regulariser(model, divisor)

where NLL comes from the shared scorer's per-choice logits, each forward uses
one posterior draw (one dropout mask, ...) for all choices of its questions,
and `w`, `divisor` come from `schedules.KLWeighting` (for Bayesian-LoRA the
regulariser is KL / divisor, so the default is beta * KL / N_train).
Gradients are averaged over processes (DDP; under FSDP2, which shards only the
frozen base model, the loop averages the adapter's, see `sharding`), so the
regulariser counts once per optimizer step whatever the number of processes.

Model selection uses only the validation questions (never the evaluation
split): the adapter of the epoch with the lowest validation NLL of the
method's predictive is kept (early stopping optional). Each optimizer step
writes one line to train_log.jsonl, built in `step_record`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

import bayeslora
from bayeslora.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from bayeslora.diagnostics import collapse_message, draw_disagreement, posterior_state, relative_updates
from bayeslora.errors import CorruptFileError, UsageError
from bayeslora.files import write_atomically
from bayeslora.inducing import MEAN, InducingFactor, draw_weights
from bayeslora.metrics import nll
from bayeslora.predictive import predict
from bayeslora.schedules import KLWeighting, lr_scheduler
from bayeslora.sharding import average_gradients, is_sharded, prepare, prepared_once
from bayeslora.tracking import scalars
from bayeslora.train_settings import TrainSettings

__all__ = ["check_batches", "fit", "FitResult", "task_loss", "TrainingDiverged", "unusable_module"]


class TrainingDiverged(RuntimeError):
    """The loss or a parameter became NaN or infinite, or a factor can no longer be drawn (its Cholesky
    factorisation fails); the last good checkpoint is kept."""


def unusable_module(model: nn.Module) -> str | None:
    """The first module with a NaN or infinite trainable parameter, or a Bayesian factor whose posterior mean
    cannot be drawn (a failed Cholesky factorisation, non-finite weights); None when every one is usable."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter).all():
            return name.rsplit(".", 1)[0]
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, InducingFactor):
                try:
                    usable = torch.isfinite(draw_weights([module], MEAN)).all()
                except torch.linalg.LinAlgError:
                    usable = False
                if not usable:
                    return name
    return None


def _diverged(model: nn.Module, output: Path, step: int, what: str) -> TrainingDiverged:
    """The one-line report of a numerical fault at optimizer `step`: what went wrong, where, what is kept."""
    module = unusable_module(model)
    last_good = latest_checkpoint(output)
    kept = f"the last good checkpoint {last_good} is kept" if last_good else "no checkpoint had been written"
    return TrainingDiverged(f"optimizer step {step}: {what}{f' (module {module})' if module else ''}; {kept}; "
                            f"a smaller --lr or --max-grad-norm may help")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training questions in `epoch`: a function of (seed, epoch) only, so resuming repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def task_loss(logits: torch.Tensor, answers: torch.Tensor, label_smoothing: float, entropy_bonus: float):
    """(training loss, NLL), both means over questions.

    NLL = -log softmax(z)[y] over the question's choices (padding logits are -inf).
    Label smoothing eps: (1 - eps) * NLL + eps * mean over real choices of -log p_k.
    Entropy bonus g: subtract g * H(p), H(p) = -sum_k p_k log p_k (nats).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, answers[:, None]).squeeze(1)
    loss = nll
    real_log_probs = log_probs.masked_fill(~torch.isfinite(logits), 0.0)
    if label_smoothing:
        uniform = -real_log_probs.sum(-1) / torch.isfinite(logits).sum(-1)
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    if entropy_bonus:
        loss = loss + entropy_bonus * (log_probs.exp() * real_log_probs).sum(-1)
    return loss.mean(), nll.mean()


def validate(model: nn.Module, scorer, method, questions: Sequence, n_samples: int | None, seed: int,
             batch_size: int, progress: bool = False) -> dict[str, Any]:
    """On held-out questions: the NLL (nats per question) of the method's predictive, mean over draws of
    softmax(z), and how much the draws disagree (mutual information, draw spread; see `diagnostics`)."""
    predictions = predict(model, scorer, questions, method, n_samples, seed, batch_size, progress)
    return {"validation_nll": nll(predictions.probs, predictions.answers), **draw_disagreement(predictions)}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: as asked, or (auto) where the hardware computes in bf16 natively."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class FitResult:
    steps: int
    best_step: int | None
    best_validation_nll: float | None
    stopped_early: bool
    validation_history: list[dict] = field(default_factory=list)
    resumed_seconds: float = 0.0  # training seconds before this process resumed the run (from the checkpoint)
    timed_from_step: int = 0  # > 0: resumed from a checkpoint that kept no time, so the steps before are not timed


def check_batches(settings: TrainSettings, n_train: int, processes: int) -> None:
    """The global batch splits evenly over processes and accumulation steps, and fits in the training set."""
    per_step = processes * settings.grad_accum
    if settings.batch_size % per_step:
        raise UsageError(f"batch_size {settings.batch_size} is not divisible by processes x grad_accum = {per_step}")
    if n_train < settings.batch_size:
        raise UsageError(f"batch_size {settings.batch_size} exceeds the {n_train} training questions")


def fit(
    model: nn.Module,
    scorer,
    method,
    train_questions: Sequence,
    validation_questions: Sequence,
    settings: TrainSettings,
    output: Path,
    accelerator: Accelerator,
    resume: bool = False,
) -> list[FitResult]:
    """Train the adapter(s) of `model` (already prepared by `method`) in place, then the method's post-hoc fit.

    A method with several members (an ensemble) trains each in turn, with seed + member index,
    in its own folder `member-<index>/`; the others train directly in `output`. While a member
    trains, the method's draws are that member's (it is selected on its own predictive).
    """
    members = list(method.members(model))
    if len(members) > 1 and prepared_once(accelerator):
        raise UsageError(f"{method.name} trains {len(members)} members in turn on one model, which "
                         f"{accelerator.distributed_type.value} prepares once: train it on one process or under DDP")
    results = []
    for index, member in enumerate(members):
        folder = output if len(members) == 1 else output / f"member-{index}"
        with member:
            results.append(_fit_member(model, scorer, method, train_questions, validation_questions, settings, folder,
                                       accelerator, settings.seed + index,
                                       resume=resume and latest_checkpoint(folder) is not None,
                                       tracker_prefix="" if len(members) == 1 else f"member-{index}/"))
    post_hoc_fit(model, scorer, method, train_questions, validation_questions, settings.eval_batch_size, accelerator.device)
    return results


def post_hoc_fit(model: nn.Module, scorer, method, train_questions: Sequence, validation_questions: Sequence,
                 batch_size: int, device: torch.device) -> None:
    """The method's fit after training (temperature, Laplace, TFB) on the validation set; nothing for most methods."""
    model.eval()
    batches = partial(_batches, scorer, batch_size=batch_size, device=device)
    method.after_training(model, batches(validation_questions), scorer.choice_logits, train_batches=batches(train_questions))


def _batches(scorer, questions: Sequence, batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    return [_to_device(scorer.collate(questions[i : i + batch_size]), device) for i in range(0, len(questions), batch_size)]


def _fit_member(model: nn.Module, scorer, method, train_questions: Sequence, validation_questions: Sequence,
                settings: TrainSettings, output: Path, accelerator: Accelerator, seed: int, resume: bool,
                tracker_prefix: str) -> FitResult:
    """`fit` for one member (the whole model for single-adapter methods), data order seeded with `seed`.

    Each train_log.jsonl record also goes to the accelerator's tracker (if any), its keys prefixed with
    `tracker_prefix`.
    """
    s = settings
    check_batches(s, len(train_questions), accelerator.num_processes)
    per_step = accelerator.num_processes * s.grad_accum
    micro_batch = s.batch_size // per_step
    steps_per_epoch = len(train_questions) // s.batch_size  # the last partial batch of an epoch is dropped
    total_steps = s.max_steps if s.max_steps is not None else s.epochs * steps_per_epoch
    bf16 = use_bf16(s.precision, accelerator.device)

    unwrapped = model.to(accelerator.device)
    parameters = [p for p in unwrapped.parameters() if p.requires_grad]
    groups = method.parameter_groups(unwrapped)
    for group in groups:  # a method may scale the learning rate of a group; schedules then scale every group alike
        group["lr"] = s.lr * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=s.lr)
    scheduler = lr_scheduler(optimizer, s.lr_schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                             warmup_steps=s.warmup_steps, milestones=tuple(s.lr_milestones))
    kl = KLWeighting(s.kl_weighting, s.beta, s.kl_warmup, s.kl_warmup_unit, len(train_questions), steps_per_epoch)
    model, optimizer = prepare(accelerator, model, optimizer, micro_batch, s.grad_accum, s.max_grad_norm)

    state = {"step": 0, "processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
             "best_step": None, "best_validation_nll": None, "epochs_without_improvement": 0, "stopped_early": False,
             "validation_history": []}
    best_adapter = None
    timed_from_step = 0
    if resume:
        state, best_adapter = load_checkpoint(output, accelerator, unwrapped, optimizer, scheduler)
        if "train_seconds" not in state:  # written before checkpoints kept the time
            timed_from_step = state["step"]
            if accelerator.is_main_process:
                print(f"bayeslora: note: the checkpoint at step {timed_from_step} kept no training time; "
                      f"train_seconds counts from there", file=sys.stderr)
    resumed_seconds = state.get("train_seconds", 0.0)
    clock = time.perf_counter()
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    log = _open_log(output / "train_log.jsonl", state["step"]) if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not accelerator.is_main_process)
    recent_nll: deque[float] = deque(maxlen=20)
    last_checkpoint = time.monotonic()

    try:
        while state["step"] < total_steps and not state["stopped_early"]:
            step = state["step"]
            epoch, position = divmod(step, steps_per_epoch)
            order = epoch_order(len(train_questions), seed, epoch)
            global_batch = [train_questions[i] for i in order[position * s.batch_size : (position + 1) * s.batch_size]]
            # this process's micro-batches: slots process_index, process_index + processes, ... of the global batch
            slots = range(accelerator.process_index, per_step, accelerator.num_processes)
            micro_batches = [global_batch[k * micro_batch : (k + 1) * micro_batch] for k in slots]

            started = time.perf_counter()
            model.train()
            weight = kl.weight(step)
            totals = torch.zeros(3, device=accelerator.device)  # loss, nll, regulariser (this process, step means)
            try:
                totals += _accumulate_gradients(model, unwrapped, scorer, method, micro_batches, kl, weight, position,
                                                steps_per_epoch, s, bf16, accelerator)
            except torch.linalg.LinAlgError:
                raise _diverged(unwrapped, output, step + 1, "a Cholesky factorisation failed") from None
            if is_sharded(accelerator):  # FSDP does not reduce the gradients of the adapter it leaves whole
                average_gradients(parameters, accelerator)
            totals = accelerator.reduce(totals, reduction="mean")
            if not torch.isfinite(totals[0]):
                raise _diverged(unwrapped, output, step + 1, f"the loss is {totals[0].item()}")
            if s.max_grad_norm:
                accelerator.clip_grad_norm_(parameters, s.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not torch.stack([torch.isfinite(p).all() for p in parameters]).all():
                raise _diverged(unwrapped, output, step + 1, "a parameter is NaN or infinite after the update")
            state["step"] = step + 1

            record = step_record(unwrapped, step + 1, epoch + 1, totals, kl.divisor, len(train_questions), weight, lr,
                                 time.perf_counter() - started)
            recent_nll.append(record["nll"])

            epoch_end = state["step"] % steps_per_epoch == 0 or state["step"] == total_steps
            selecting = s.select_epoch == "best"
            if validation_questions and (epoch_end if selecting else state["step"] == total_steps):
                validation = validate(unwrapped, scorer, method, validation_questions, s.samples, s.seed, s.eval_batch_size,
                                      progress=accelerator.is_main_process)
                record["validation"] = validation
                state["validation_history"].append({"step": state["step"], "epoch": epoch + 1, **validation})
                judged = "lambda_mean" in record and s.samples != 1  # one draw has no disagreement to judge
                message = collapse_message(validation["mutual_information"], record) if judged else None
                if message and not state.get("collapse_reported") and accelerator.is_main_process:
                    tqdm.write(f"bayeslora: warning: {message}", file=sys.stderr)
                    state["collapse_reported"] = True
                value = validation["validation_nll"]
                # with select_epoch "last" the validation only describes the adapter that is kept
                if selecting and (state["best_validation_nll"] is None or value < state["best_validation_nll"]):
                    state.update(best_step=state["step"], best_validation_nll=value, epochs_without_improvement=0)
                    best_adapter = trainable_state(unwrapped)
                elif selecting:
                    state["epochs_without_improvement"] += 1
                    state["stopped_early"] = s.early_stopping is not None and state["epochs_without_improvement"] >= s.early_stopping
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            accelerator.log(scalars(record, tracker_prefix), step=record["step"])
            bar.update(1)
            last_mi = state["validation_history"][-1]["mutual_information"] if state["validation_history"] else None
            bar.set_postfix(nll=f"{sum(recent_nll) / len(recent_nll):.3f}", kl_per_example=f"{record['kl_per_example']:.3g}",
                            mi="-" if last_mi is None else f"{last_mi:.2g}", lr=f"{lr:.2g}")
            if epoch_end or state["step"] % s.checkpoint_every == 0 or _minutes_passed(last_checkpoint, s, accelerator):
                if unusable_module(unwrapped) is not None:  # only good checkpoints are written
                    raise _diverged(unwrapped, output, state["step"], "the parameters can no longer be used")
                state["train_seconds"] = resumed_seconds + time.perf_counter() - clock
                save_checkpoint(output, accelerator, unwrapped, scheduler, state, best_adapter)
                last_checkpoint = time.monotonic()
    finally:  # a fault ends the progress bar's line first, so the one-line report stands on its own
        bar.close()
        if log is not None:
            log.close()
    if best_adapter is not None:
        load_trainable_state(unwrapped, best_adapter)
    return FitResult(state["step"], state["best_step"], state["best_validation_nll"], state["stopped_early"],
                     state["validation_history"], resumed_seconds, timed_from_step)


def _accumulate_gradients(model, unwrapped: nn.Module, scorer, method, micro_batches: list, kl: KLWeighting,
                          weight: float, position: int, steps_per_epoch: int, s: TrainSettings, bf16: bool,
                          accelerator: Accelerator) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one optimizer step; returns the step's mean
    loss, NLL and regulariser on this process."""
    totals = torch.zeros(3, device=accelerator.device)
    for k, questions in enumerate(micro_batches):
        batch = _to_device(scorer.collate(questions), accelerator.device)
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            # one posterior draw for all passes of this forward (a cloze prompt and its choices);
            # a no-op for adapters without Bayesian factors
            with bayeslora.sampling(unwrapped, "sample", hold=True), \
                    torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = scorer.choice_logits(model, batch)
            loss, nll = task_loss(logits.float(), batch["answers"], s.label_smoothing, s.entropy_bonus)
            regulariser = method.regulariser(unwrapped, kl.divisor, position, steps_per_epoch)
            if regulariser is not None:
                loss = loss + weight * regulariser
            accelerator.sync_gradients = last  # DeepSpeed's engine steps the optimizer at the last micro-batch
            accelerator.backward(loss)  # divided by the accumulation steps (by DeepSpeed's engine under DeepSpeed)
        totals += torch.stack([loss.detach(), nll.detach(),
                               regulariser.detach() if regulariser is not None else torch.zeros((), device=totals.device)])
    return totals / len(micro_batches)


def step_record(model: nn.Module, step: int, epoch: int, totals: torch.Tensor, kl_divisor: float, n_train: int,
                weight: float, lr: float, seconds: float) -> dict[str, Any]:
    """The train_log.jsonl line of one optimizer step (1-based `step` and `epoch`): every per-step diagnostic goes here.

    `totals` holds the step's mean loss, NLL and regulariser; `kl` is the regulariser times its divisor (for
    Bayesian-LoRA the model's KL in nats), `kl_per_example` that over the `n_train` training questions. For a
    Bayesian model the record adds the posterior's state (`diagnostics.posterior_state`), its KL parts per
    training example; for every LoRA model the relative update size per target module.
    """
    record = {"step": step, "epoch": epoch, "loss": totals[0].item(), "nll": totals[1].item(),
              "kl": totals[2].item() * kl_divisor, "kl_per_example": totals[2].item() * kl_divisor / n_train,
              "beta": weight, "lr": lr, "seconds": seconds}
    if bayeslora.is_bayesian(model):
        state = posterior_state(model)
        state["kl_inducing_per_example"] = state.pop("kl_inducing") / n_train
        state["kl_conditional_per_example"] = state.pop("kl_conditional") / n_train
        record.update(state)
    else:
        record["relative_update"] = relative_updates(model)
    return record


def _minutes_passed(since: float, settings: TrainSettings, accelerator: Accelerator) -> bool:
    """Whether `checkpoint_minutes` passed since the last checkpoint, agreed by every process (any one's clock)."""
    if not settings.checkpoint_minutes:
        return False
    due = torch.tensor(float(time.monotonic() - since >= 60 * settings.checkpoint_minutes), device=accelerator.device)
    return bool(accelerator.reduce(due, reduction="sum") > 0)


def _open_log(path: Path, keep_through_step: int):
    """The per-step log, opened for appending; on resume, lines after the checkpoint's step are dropped, and so
    is a last line cut short by a kill (any other unreadable line is a `CorruptFileError`)."""
    kept = []
    if keep_through_step and path.is_file():
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise CorruptFileError(f"{path}: line {number} is not a JSON record") from None
            if record["step"] <= keep_through_step:
                kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))
    return path.open("a")
