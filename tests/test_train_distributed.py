"""`accelerate launch` with two CPU processes (gloo): the loop under DDP and DeepSpeed ZeRO-2, resume, FSDP2's premises.

The tests launch this file as the worker twice (module fixtures: DDP, DeepSpeed) and check what it wrote:
- both processes end with the same adapter, the one a single process computes on the same global
  batches: the mean NLL over the global batch plus the regulariser counted once per step;
- a two-process run interrupted after a checkpoint and resumed from accelerate's saved state
  (optimizer, every process's random-number generators) ends with the uninterrupted run's adapter;
- the same under DeepSpeed ZeRO-2 (accelerate sets it up on CPU processes over gloo when not told
  cpu=True), resumed from the engine's optimizer shards; Bayesian-LoRA is refused there (DeepSpeed
  cannot broadcast its 0-dimensional lambda);
- torch's FSDP2 (`fully_shard`, what accelerate's FSDP2 applies) shards the base model over the two CPU
  processes while the adapter it is told to ignore (`sharding.adapter_modules`) stays whole, and with
  `sharding.average_gradients` training gives the single-process adapter (and the same validation NLL and
  update sizes, read on the sharded model); the gathered state dict saved by peft holds the whole adapter;
  accelerate's FSDP2 checkpoint helpers (what `Accelerator.save_state` / `load_state` call under FSDP)
  save and restore it. accelerate itself sets up FSDP on accelerator devices only (`check_launch` refuses
  the launch on CPU), so the loop's own FSDP path is not run here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from bayeslora.errors import UsageError
from bayeslora.sharding import adapter_modules, check_launch
from tests.conftest import make_tiny_llama
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


def resumed(output: Path, accelerator: Accelerator, method_name: str) -> tuple[dict, dict]:
    """(uninterrupted, interrupted after its step-4 checkpoint and resumed) adapters of one two-process run."""
    from accelerate.utils import set_seed

    from bayeslora.checkpoint import trainable_state
    from bayeslora.experiment import split_validation
    from bayeslora.methods import get_method
    from bayeslora.train import fit
    from tests.test_train_loop import Interrupt, InterruptingScorer, fixture_questions, settings, tiny_model, tiny_scorer

    method = get_method(method_name, **({"inducing_rows": 3, "inducing_cols": 3} if method_name == "bayeslora" else {}))
    train, validation = split_validation(fixture_questions(32), 8, seed=0, limit=None)
    # 3 steps per epoch, 2 micro-batches per process per step; a linear schedule makes the scheduler state matter
    s = dict(batch_size=8, grad_accum=2, epochs=2, checkpoint_every=2, lr_schedule="linear", warmup_steps=1,
             lora_dropout=0.1)  # dropout masks and posterior draws: each process's random stream matters
    adapters = []
    for name, interrupt_after in (("straight", None), ("resumed", 8)):
        set_seed(0, device_specific=True)
        model = tiny_model(method, dropout=0.1)
        if interrupt_after is not None:  # inside step 5 of 6: training forwards 9 and 10 of each process
            try:
                fit(model, InterruptingScorer(interrupt_after), method, train, validation,
                    settings(output / name, **s), output / name, accelerator)
            except Interrupt:
                pass
            set_seed(1234, device_specific=True)  # the resumed run starts from other random states
            model = tiny_model(method, dropout=0.1)
        fit(model, tiny_scorer(), method, train, validation, settings(output / name, **s), output / name, accelerator,
            resume=interrupt_after is not None)
        adapters.append(trainable_state(model))
    return adapters[0], adapters[1]


def fully_sharded(method, accelerator: Accelerator | None, seed: int):
    """The tiny model (adapter initialised with `seed`) and its AdamW; with `accelerator` (two processes) the base
    model sharded by torch's `fully_shard` per decoder layer and at the root, the adapter left whole."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from tests.test_train_loop import tiny_model

    model = tiny_model(method, seed=seed)
    if accelerator is not None:
        ignored = {p for module in adapter_modules(model) for p in module.parameters()}
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        assert all(isinstance(p, DTensor) != p.requires_grad for p in model.parameters())
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def fsdp2_adapter(method_name: str, accelerator: Accelerator | None, checkpoint: Path | None = None,
                  peft_folder: Path | None = None):
    """Four steps of NLL + regulariser on 8 questions (each process scores its half); with `checkpoint`, accelerate's
    FSDP helpers save the sharded model and the optimizer there after step 2, and training goes on from another
    model (other adapter initialisation) that they load it into.

    Returns the adapter, and as `diagnostics.*` what the loop reads on the (sharded) model after training: the
    validation NLL of the method's predictive on all 8 questions and the relative update per target module.
    With `peft_folder`, the whole state dict is gathered and the main process saves the adapter there with peft,
    as `bayeslora train` does."""
    from accelerate.utils import (FullyShardedDataParallelPlugin, load_fsdp_model, load_fsdp_optimizer,
                                  save_fsdp_model, save_fsdp_optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import bayeslora
    from bayeslora.checkpoint import trainable_state
    from bayeslora.diagnostics import relative_updates
    from bayeslora.methods import get_method
    from bayeslora.sharding import average_gradients
    from bayeslora.train import validate
    from tests.test_train_loop import ToyLoRA, fixture_questions, tiny_scorer

    method = ToyLoRA() if method_name == "toy" else get_method(method_name, inducing_rows=3, inducing_cols=3)
    scorer, questions = tiny_scorer(), fixture_questions(8)
    if accelerator is not None:
        questions = questions[accelerator.process_index * 4 : (accelerator.process_index + 1) * 4]
    model, optimizer = fully_sharded(method, accelerator, seed=0)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    for step in range(4):
        if checkpoint is not None and step == 2:
            save_fsdp_model(plugin, accelerator, model, checkpoint)
            save_fsdp_optimizer(plugin, accelerator, optimizer, model, checkpoint)
            model, optimizer = fully_sharded(method, accelerator, seed=1)
            load_fsdp_model(plugin, accelerator, model, checkpoint)
            load_fsdp_optimizer(plugin, accelerator, optimizer, model, checkpoint)
        batch = scorer.collate(questions)
        with bayeslora.sampling(model, "sample", hold=True):
            logits = scorer.choice_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["answers"]) + method.regulariser(model, 100)
        loss.backward()
        if accelerator is not None:
            average_gradients([p for p in model.parameters() if p.requires_grad], accelerator)
        optimizer.step()
        optimizer.zero_grad()
    if peft_folder is not None:  # gathered as `Accelerator.get_state_dict` gathers under FSDP2, saved by the main process
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
        if accelerator.is_main_process:
            model.save_pretrained(peft_folder, state_dict=state_dict)
    diagnostics = {"validation_nll": validate(model, scorer, method, fixture_questions(8), None, 0, 8)["validation_nll"],
                   **relative_updates(model)}
    return {**trainable_state(model), **{f"diagnostics.{key}": torch.tensor(value) for key, value in diagnostics.items()}}


def worker(output: Path, launch: str) -> None:
    """What the tests read back, per process: DDP over gloo, or DeepSpeed (ZeRO-2) over gloo."""
    if launch == "deepspeed":  # accelerate sets up DeepSpeed on CPU processes when not told cpu=True
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        assert accelerator.distributed_type == DistributedType.DEEPSPEED
    else:
        accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    save_file(train_toy(output / "toy", accelerator), output / f"toy-{rank}.safetensors")
    # Bayesian-LoRA's lambda is a 0-dimensional parameter, which DeepSpeed's engine cannot broadcast
    straight, resumed_adapter = resumed(output, accelerator, "mle" if launch == "deepspeed" else "bayeslora")
    save_file(straight, output / f"straight-{rank}.safetensors")
    save_file(resumed_adapter, output / f"resumed-{rank}.safetensors")
    if launch == "deepspeed":
        try:
            train_bayeslora(output / "bayeslora", accelerator)
        except UsageError as error:
            (output / f"refused-{rank}.txt").write_text(str(error))
        return
    save_file(train_bayeslora(output / "bayeslora", accelerator), output / f"bayeslora-{rank}.safetensors")
    save_file(fsdp2_adapter("toy", accelerator, peft_folder=output / "fsdp2-peft"), output / f"fsdp2-toy-{rank}.safetensors")
    save_file(fsdp2_adapter("bayeslora", accelerator), output / f"fsdp2-bayeslora-{rank}.safetensors")
    save_file(fsdp2_adapter("toy", accelerator, output / "fsdp2-checkpoint"), output / f"fsdp2-resumed-{rank}.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(folder: Path, *options: str, worker_launch: str) -> Path:
    """Run `worker` in two processes started by `accelerate launch` with `options`; the folder they wrote into."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), __file__, str(folder), worker_launch]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("launched"), "--multi_gpu", worker_launch="ddp")


@pytest.fixture(scope="module")
def deepspeed_launched(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    return launch(tmp_path_factory.mktemp("deepspeed"), "--use_deepspeed", "--zero_stage", "2",
                  worker_launch="deepspeed")


def both(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What process 0 and process 1 saved as `name`; asserts they are equal."""
    first, second = (load_file(folder / f"{name}-{rank}.safetensors") for rank in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    return first, second


@pytest.fixture(scope="module")
def single_process_toy(tmp_path_factory, one_thread) -> dict[str, torch.Tensor]:
    return train_toy(tmp_path_factory.mktemp("single"), Accelerator(cpu=True))


def test_two_processes_match_one_process_on_the_same_global_batches(launched, single_process_toy, tmp_path, one_thread):
    first, _ = both(launched, "toy")
    both(launched, "bayeslora")
    assert all(torch.allclose(first[name], single_process_toy[name], atol=1e-5) for name in first)
    # the comparison can tell: the regulariser counted twice gives a clearly different adapter
    doubled = train_toy(tmp_path / "doubled", Accelerator(cpu=True), beta=2 * BETA)
    assert max((doubled[name] - first[name]).abs().max().item() for name in first) > 1e-3


def assert_resumed_to_the_uninterrupted_adapter(folder: Path) -> None:
    straight, _ = both(folder, "straight")
    resumed, _ = both(folder, "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_two_processes_resume_from_accelerate_state_to_the_uninterrupted_adapter(launched):
    assert_resumed_to_the_uninterrupted_adapter(launched)
    # the checkpoint holds accelerate's optimizer state and both processes' generators, not the whole model
    checkpoint = launched / "resumed" / "checkpoints" / "step-000006" / "accelerate"
    assert sorted(path.name for path in checkpoint.iterdir()) == ["optimizer.bin", "random_states_0.pkl",
                                                                   "random_states_1.pkl"]


def test_deepspeed_zero2_trains_like_one_process_and_resumes_from_its_optimizer_shards(deepspeed_launched,
                                                                                        single_process_toy):
    first, _ = both(deepspeed_launched, "toy")
    assert all(torch.allclose(first[name], single_process_toy[name], atol=1e-5) for name in first)
    assert_resumed_to_the_uninterrupted_adapter(deepspeed_launched)
    # each process wrote its shard of the optimizer state; the engine's module file holds the adapter only
    engine = deepspeed_launched / "resumed" / "checkpoints" / "step-000006" / "accelerate" / "pytorch_model"
    shards = sorted(path.name for path in engine.glob("*optim_states.pt"))
    assert len(shards) == 2, sorted(path.name for path in engine.iterdir())
    module = torch.load(next(engine.glob("*model_states.pt")), weights_only=True)["module"]
    assert module and all("lora_" in name for name in module)
    for rank in (0, 1):
        assert (deepspeed_launched / f"refused-{rank}.txt").read_text() == (
            "DeepSpeed cannot broadcast the 0-dimensional parameter "
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.lambda_raw: train this method under "
            "FSDP2 or DDP")


def test_fsdp2_shards_the_base_model_and_trains_the_whole_adapter_like_one_process(launched, one_thread):
    sharded, _ = both(launched, "fsdp2-toy")
    single = fsdp2_adapter("toy", None)
    assert sharded.keys() == single.keys() and any(name.startswith("diagnostics.") for name in single)
    assert all(torch.allclose(sharded[name], single[name], atol=1e-5) for name in single)
    # peft's adapter file of the sharded model: the whole adapter, and lm_head's base weight (an adapted output
    # embedding), gathered from both processes' shards
    saved = load_file(launched / "fsdp2-peft" / "adapter_model.safetensors")
    assert torch.equal(saved.pop("base_model.model.lm_head.base_layer.weight"), make_tiny_llama().lm_head.weight)
    adapter = {name: value for name, value in sharded.items() if not name.startswith("diagnostics.")}
    assert {name.replace(".weight", ".default.weight") for name in saved} == adapter.keys()
    assert all(torch.equal(value, adapter[name.replace(".weight", ".default.weight")]) for name, value in saved.items())
    both(launched, "fsdp2-bayeslora")  # posterior draws and KL on the whole factors, equal on both processes
    # accelerate's FSDP2 checkpoint helpers restore the sharded model and the whole optimizer state
    resumed, _ = both(launched, "fsdp2-resumed")
    assert all(torch.equal(resumed[name], sharded[name]) for name in sharded)


def test_adapter_modules_hold_exactly_the_trainable_parameters():
    from bayeslora.methods import get_method
    from tests.test_train_loop import tiny_model

    for name in ("mle", "bayeslora", "blob"):
        model = tiny_model(get_method(name))
        held = {id(p) for module in adapter_modules(model) for p in module.parameters()}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}, name
        if name == "bayeslora":  # its factors carry their flows (the default), held with them
            assert any(".flow." in key for key, p in model.named_parameters() if p.requires_grad)


def launch_state(distributed_type: DistributedType, mixed_precision: str = "no", fsdp_plugin=None, deepspeed_plugin=None):
    """What `check_launch` reads of an `AcceleratorState` (a process has one only)."""
    return SimpleNamespace(distributed_type=distributed_type, mixed_precision=mixed_precision, fsdp_plugin=fsdp_plugin,
                           deepspeed_plugin=deepspeed_plugin)


def test_launches_the_loop_does_not_run_under_are_refused(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # restored afterwards: the plugin sets it
    fsdp = {version: FullyShardedDataParallelPlugin(fsdp_version=version) for version in (1, 2)}
    zero = {stage: DeepSpeedPlugin(zero_stage=stage) for stage in (2, 3)}
    refused = {
        "does not run under MEGATRON_LM": launch_state(DistributedType.MEGATRON_LM),
        "runs under FSDP2 only, not FSDP1": launch_state(DistributedType.FSDP, fsdp_plugin=fsdp[1]),
        "cpu_ram_efficient_loading": launch_state(DistributedType.FSDP, fsdp_plugin=FullyShardedDataParallelPlugin(
            fsdp_version=2, cpu_ram_efficient_loading=True)),
        "runs under DeepSpeed ZeRO-1 or 2, not ZeRO-3": launch_state(DistributedType.DEEPSPEED, deepspeed_plugin=zero[3]),
        "DeepSpeed's bf16 casts every parameter": launch_state(DistributedType.DEEPSPEED, "bf16", deepspeed_plugin=zero[2]),
    }
    for message, state in refused.items():
        with pytest.raises(UsageError, match=message):
            check_launch(state, {})
    # accelerate turns an FSDP launch on CPU processes into DDP: refused, not trained as something else
    with pytest.raises(UsageError, match="launched for FSDP, but accelerate set up MULTI_CPU"):
        check_launch(launch_state(DistributedType.MULTI_CPU), {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(UsageError, match="launched for DEEPSPEED, but accelerate set up NO"):
        check_launch(launch_state(DistributedType.NO), {"ACCELERATE_USE_DEEPSPEED": "True"})
    for whole in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_launch(launch_state(whole, "bf16"), {"ACCELERATE_USE_FSDP": "false"})
    check_launch(launch_state(DistributedType.FSDP, "bf16", fsdp_plugin=fsdp[2]), {"ACCELERATE_USE_FSDP": "true"})
    check_launch(launch_state(DistributedType.DEEPSPEED, deepspeed_plugin=zero[2]), {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_deepspeed_config_takes_the_loops_batch_accumulation_and_clipping():
    from accelerate.utils import DeepSpeedPlugin

    from bayeslora.sharding import configure_deepspeed
    from tests.test_train_loop import ToyLoRA, tiny_model

    def under(plugin):
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    auto = DeepSpeedPlugin(zero_stage=2)
    configure_deepspeed(under(auto), tiny_model(ToyLoRA()), micro_batch=3, grad_accum=2, max_grad_norm=0.5)
    assert {key: auto.deepspeed_config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                         "train_batch_size", "gradient_clipping")} == \
        {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "train_batch_size": 12,
         "gradient_clipping": 0.5}
    with pytest.raises(UsageError, match="the DeepSpeed config sets gradient_accumulation_steps to 4, this run needs 2"):
        configure_deepspeed(under(DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=4)),
                            tiny_model(ToyLoRA()), micro_batch=3, grad_accum=2, max_grad_norm=0.5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
