"""`accelerate launch` with two CPU processes (gloo): global-batch semantics of the loop.

The test launches this file as the worker. Both processes must end with the
same adapter, and that adapter must be the one a single process computes on
the same global batches: the mean NLL over the global batch plus the
regulariser counted once per step, not once per process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from bayeslora.errors import UsageError
from bayeslora.experiment import check_not_sharded
from tests.test_train_loop import one_thread  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
# a strong regulariser, so counting it once per process would move the adapter far from the reference
BETA = 20.0


def train_toy(output: Path, accelerator: Accelerator, beta: float = BETA) -> dict[str, torch.Tensor]:
    from bayeslora.checkpoint import trainable_state
    from bayeslora.experiment import split_validation
    from bayeslora.train import fit
    from tests.test_train_loop import ToyLoRA, fixture_questions, settings, tiny_model, tiny_scorer

    train, validation = split_validation(fixture_questions(40), 8, seed=0, limit=None)
    s = settings(output, batch_size=8, grad_accum=2, epochs=2, beta=beta, lr=5e-3)
    model = tiny_model(ToyLoRA())
    fit(model, tiny_scorer(), ToyLoRA(), train, validation, s, output, accelerator)
    return trainable_state(model)


def train_bayeslora(output: Path, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Real Bayesian-LoRA factors, a posterior draw per forward (different on each process)."""
    from accelerate.utils import set_seed

    from bayeslora.checkpoint import trainable_state
    from bayeslora.methods import get_method
    from bayeslora.experiment import split_validation
    from bayeslora.train import fit
    from tests.test_train_loop import fixture_questions, settings, tiny_model, tiny_scorer

    method = get_method("bayeslora", inducing_rows=3, inducing_cols=3)
    train, validation = split_validation(fixture_questions(24), 8, seed=0, limit=None)
    model = tiny_model(method)
    set_seed(0, device_specific=True)
    fit(model, tiny_scorer(), method, train, validation, settings(output, batch_size=8, epochs=1), output, accelerator)
    return trainable_state(model)


def worker(output: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    save_file(train_toy(output / "toy", accelerator), output / f"toy-{rank}.safetensors")
    save_file(train_bayeslora(output / "bayeslora", accelerator), output / f"bayeslora-{rank}.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path, one_thread):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), __file__, str(tmp_path)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    first, second = (load_file(tmp_path / f"toy-{rank}.safetensors") for rank in (0, 1))
    assert all(torch.equal(first[name], second[name]) for name in first)
    bayes_first, bayes_second = (load_file(tmp_path / f"bayeslora-{rank}.safetensors") for rank in (0, 1))
    assert all(torch.equal(bayes_first[name], bayes_second[name]) for name in bayes_first)

    single = train_toy(tmp_path / "single", Accelerator(cpu=True))
    assert all(torch.allclose(first[name], single[name], atol=1e-5) for name in first)
    # the comparison can tell: the regulariser counted twice gives a clearly different adapter
    doubled = train_toy(tmp_path / "doubled", Accelerator(cpu=True), beta=2 * BETA)
    assert max((doubled[name] - first[name]).abs().max().item() for name in first) > 1e-3


def test_sharded_launches_are_refused_before_anything_is_written():
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UsageError, match=f"not under {sharded.value}"):
            check_not_sharded(sharded)
    for whole in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_not_sharded(whole)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
