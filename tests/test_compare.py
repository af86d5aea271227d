"""`bayeslora compare`: bad input, the table arithmetic, and the smoke preset end to end (every method)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# compare runs on the shared path: skip only until the training loop and the evaluation path are merged
pytest.importorskip("bayeslora.train")
pytest.importorskip("bayeslora.evaluate")

from bayeslora.cli import build_parser, main  # noqa: E402
from bayeslora.compare import Grid, resolve_grid, with_finished_units  # noqa: E402
from bayeslora.output_dir import output_lock  # noqa: E402
from bayeslora.presets import ALL_METHODS  # noqa: E402
from bayeslora.report import collect, markdown_blocks  # noqa: E402


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _fail(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "arc_easy", "--methods", "mle,lora"], "unknown method 'lora' in --methods; valid methods: bayeslora, blob"),
        (["--tasks", "arc_eazy", "--methods", "mle"], "unknown task 'arc_eazy' in --tasks; valid tasks: arc_easy"),
        (["--tasks", "mmlu_chem", "--methods", "mle"], "task 'mmlu_chem' in --tasks has no 'train' split"),
        (["--tasks", "arc_easy", "--methods", "mle", "--ood-tasks", "arc_challenge"], "--ood-from and --ood-tasks go together"),
        (["--tasks", "arc_easy", "--methods", "mle,mle"], "--methods lists mle more than once"),
        (["--tasks", "arc_easy", "--methods", "mle", "--seeds", "1,x"], "--seeds must be comma-separated integers"),
        (["--tasks", "arc_easy", "--methods", "mle", "--samples", "0"], "samples must be > 0, got 0"),
        (["--preset", "bogus"], "argument --preset: invalid choice: 'bogus'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, message):
    output = tmp_path / "out"
    assert message in _fail(capsys, ["compare", *flags, "--output", str(output)])
    assert not output.exists()


def _fake_results(grid, task, method, seed, accuracy, ece, nll):
    target = grid.results_dir(task, task, method, seed)
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps({"accuracy_percent": accuracy, "ece_percent": ece, "nll": nll}))


def test_tables_are_mean_and_sample_std_over_seeds_with_the_best_in_bold(tmp_path):
    grid = Grid("m", ["a", "b"], ["mle", "blob"], [1, 2], None, [], {"scoring": "cloze"}, {}, tmp_path)
    for seed, (acc_a, acc_b) in {1: (50.0, 70.0), 2: (60.0, 80.0)}.items():
        _fake_results(grid, "a", "mle", seed, acc_a, 10.0, 1.0)
        _fake_results(grid, "b", "mle", seed, acc_b, 20.0, 2.0)
        _fake_results(grid, "a", "blob", seed, acc_a - 5, 5.0, 0.5)
        _fake_results(grid, "b", "blob", seed, acc_b + 10, 4.0, 0.4)
    table = collect(grid, {"a": "a", "b": "b"}, ["a", "b"])
    assert table["accuracy_percent"]["mle"]["a"] == {"mean": 55.0, "std": math.sqrt(50.0), "n_seeds": 2}
    # average over tasks per seed (60, 70), then over seeds
    assert table["accuracy_percent"]["mle"]["average"]["mean"] == 65.0
    lines = markdown_blocks(table, grid.methods, grid.tasks)
    assert "| mle | **55.0 ± 7.1** | 75.0 ± 7.1 | 65.0 ± 7.1 |" in lines
    assert "| blob | 50.0 ± 7.1 | **85.0 ± 7.1** | **67.5 ± 7.1** |" in lines
    assert "| blob | **5.0 ± 0.0** | **4.0 ± 0.0** | **4.5 ± 0.0** |" in lines  # ECE: lower is better


def test_the_summary_script_reads_the_tables_mean_std_and_ratio_to_mle(tmp_path):
    spec = importlib.util.spec_from_file_location("comparison_summary", SCRIPTS / "comparison_summary.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    grid = Grid("m", ["a"], ["mle", "blob"], [1, 2], None, [], {"scoring": "cloze"}, {}, tmp_path)
    for seed, accuracy in ((1, 50.0), (2, 60.0)):
        _fake_results(grid, "a", "mle", seed, accuracy, 20.0, 1.0)
    _fake_results(grid, "a", "blob", 1, 70.0, 5.0, 0.5)
    lines = script.summary({"in_distribution": collect(grid, {"a": "a"}, ["a"])})
    assert lines[2] == "| mle | 2 | 55.0 ± 7.1 | 20.0 ± 0.0 | 1.000 ± 0.000 | – | 1.00 | – |"
    assert lines[3] == "| blob | 1 | 70.0 | 5.0 | 0.500 | – | 0.25 | – |"


def test_a_post_hoc_method_brings_its_base_method_into_the_grid(tmp_path):
    args = build_parser().parse_args(["compare", "--preset", "smoke", "--methods", "temperature,mle,tfb",
                                      "--output", str(tmp_path / "out")])
    grid = resolve_grid(args)
    assert grid.methods == ["map", "temperature", "mle", "tfb"]
    assert [method for _, method, _ in grid.units()] == ["map", "mle", "temperature", "tfb"]
    assert grid.settings("smoke_arith", "temperature", 1).adapter_from == str(grid.unit_dir("smoke_arith", "map", 1))


def test_tables_cover_every_finished_unit_of_the_directory(tmp_path):
    grid = Grid("m", ["a"], ["blob"], [2], "a", ["shift"], {"scoring": "cloze"}, {}, tmp_path)
    for method, seed in (("blob", 2), ("mle", 1), ("bayeslora", 3), ("mle", 2)):
        _fake_results(grid, "a", method, seed, 50.0, 10.0, 1.0)
        (grid.unit_dir("a", method, seed) / "eval/shift").mkdir(parents=True)
        (grid.unit_dir("a", method, seed) / "eval/shift/results.json").write_text("{}")
        (grid.unit_dir("a", method, seed) / "cost.json").write_text("{}")
    _fake_results(grid, "a", "map", 1, 50.0, 10.0, 1.0)  # unfinished: no cost.json, no shift evaluation
    widened = with_finished_units(grid)
    assert widened.methods == ["mle", "blob", "bayeslora"]  # the presets' order, whichever run came last
    assert widened.seeds == [1, 2, 3]
    assert (widened.output, widened.tasks, widened.train) == (grid.output, grid.tasks, grid.train)


def test_smoke_preset_runs_every_method_and_a_rerun_reuses_every_unit(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two busy ones
    try:
        output = tmp_path / "smoke"
        assert main(["compare", "--preset", "smoke", "--output", str(output)]) == 0
        table = json.loads((output / "table.json").read_text())
        for part, task in (("in_distribution", "smoke_arith"), ("out_of_distribution", "smoke_shift")):
            for key in ("accuracy_percent", "ece_percent", "nll"):
                assert set(table[part][key]) == set(ALL_METHODS)
                assert all(0 <= table[part][key][m][task]["mean"] < 1000 for m in ALL_METHODS)
            assert all((output / "reliability" / ("smoke_arith" if part == "in_distribution" else "smoke_arith-to-smoke_shift")
                        / f"{m}.png").is_file() for m in ALL_METHODS)
        cost = table["cost"]
        assert cost["ensemble"]["trainable_parameters"] == 3 * cost["mle"]["trainable_parameters"]
        assert cost["bayeslora"]["trainable_parameters"] > cost["mle"]["trainable_parameters"]
        markdown = (output / "table.md").read_text()
        assert "N = 2 for every sampling method" in markdown and "scoring: cloze" in markdown
        results = json.loads((output / "runs/smoke_arith/blob/seed-1/results.json").read_text())
        assert results["n_samples"] == 2 and results["method"] == "blob"
        fitted = json.loads((output / "runs/smoke_arith/temperature/seed-1/cost.json").read_text())["method_values"]
        assert fitted["temperature"] > 0 and fitted["temperature"] != 1.0
        ensemble = json.loads((output / "runs/smoke_arith/ensemble/seed-1/results.json").read_text())
        assert ensemble["n_samples"] == 3
        # post-hoc methods fit map's adapter of the same task and seed instead of training their own
        runs = output / "runs/smoke_arith"
        trained = load_file(runs / "map/seed-1/adapter_model.safetensors")
        for method in ("temperature", "laplace", "laplace_last"):
            assert json.loads((runs / method / "seed-1/run.json").read_text())["adapter_from"] == str(runs / "map/seed-1")
            reused = load_file(runs / method / "seed-1/adapter_model.safetensors")
            assert reused.keys() == trained.keys() and all(torch.equal(reused[k], trained[k]) for k in trained)
            assert not (runs / method / "seed-1/train_log.jsonl").exists()
        assert "mutual_information" in table["in_distribution"]
        capsys.readouterr()

        # an unfinished unit (no cost.json) is redone; every finished one is reused as it is
        (unit_dir_of := output / "runs/smoke_arith/tfb/seed-1/cost.json").unlink()
        before = (output / "runs/smoke_arith/mle/seed-1/results.json").read_text()
        assert main(["compare", "--preset", "smoke", "--output", str(output)]) == 0
        printed = capsys.readouterr().out
        assert printed.count("finished earlier, reused") == len(ALL_METHODS) - 1
        assert unit_dir_of.is_file()
        assert (output / "runs/smoke_arith/mle/seed-1/results.json").read_text() == before
        # the same directory with other settings is refused
        message = _fail(capsys, ["compare", "--preset", "smoke", "--samples", "3", "--output", str(output)])
        assert "holds a comparison with samples = 2, not 3" in message
    finally:
        torch.set_num_threads(threads)


def _record_grid(command: list[str]) -> None:
    """DIR/grid.json as a compare of `command` writes it when it starts."""
    grid = resolve_grid(build_parser().parse_args(command))
    grid.output.mkdir(parents=True)
    (grid.output / "grid.json").write_text(json.dumps({"identity": grid.identity()}))


def test_units_held_by_another_process_are_left_to_it_and_the_rest_of_the_grid_runs(tmp_path, capsys):
    """Two compares may share a directory: a unit whose run folder is locked (being run elsewhere) is skipped,
    and so is a post-hoc unit whose base unit is; a rerun after the other process ends completes the grid."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path / "shared"
    command = ["compare", "--preset", "smoke", "--methods", "mle,temperature", "--output", str(output)]
    runs = output / "runs/smoke_arith"
    try:
        _record_grid(command)  # another compare of this grid started and is running map's unit
        with output_lock(runs / "map/seed-1"):
            assert main(command) == 0
        printed = capsys.readouterr().out
        assert "smoke_arith / map / seed 1: running in another process, left to it" in printed
        assert "smoke_arith / temperature / seed 1: its base unit (map) is not finished" in printed
        assert "not run here: smoke_arith / temperature / seed 1: rerun once map's unit" in printed
        assert (runs / "mle/seed-1/cost.json").is_file()
        assert not (runs / "map/seed-1/results.json").exists() and not (runs / "temperature/seed-1").exists()
        accuracy = json.loads((output / "table.json").read_text())["in_distribution"]["accuracy_percent"]
        assert accuracy["mle"] and not accuracy["map"] and not accuracy["temperature"]

        assert main(command) == 0  # the other process is gone: its units run here
        assert capsys.readouterr().out.count("finished earlier, reused") == 1
        accuracy = json.loads((output / "table.json").read_text())["in_distribution"]["accuracy_percent"]
        assert all(accuracy[method]["smoke_arith"]["n_seeds"] == 1 for method in ("mle", "map", "temperature"))
    finally:
        torch.set_num_threads(threads)


def test_a_post_hoc_unit_whose_base_unit_failed_is_a_failure_not_a_silent_skip(tmp_path, capsys):
    output = tmp_path / "failed-base"
    command = ["compare", "--preset", "smoke", "--methods", "temperature", "--output", str(output)]
    _record_grid(command)
    blocker = output / "runs/smoke_arith/map/seed-1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a run folder")  # map's unit cannot be written
    assert main(command) == 1
    printed = capsys.readouterr().out
    assert "failed: smoke_arith / temperature / seed 1: its base unit (map) did not finish" in printed


def test_a_base_unit_whose_adapter_is_gone_is_trained_again_and_its_adapter_used_only_if_it_repeats_the_unit(
        tmp_path, capsys):
    """A grid's results are committed and its weights are not: in a new checkout map's unit is finished but has no
    adapter. Its post-hoc units then train it again, and use the new adapter only if its test probabilities are the
    unit's recorded ones; otherwise the post-hoc unit fails, naming the difference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path / "checkout"
    command = ["compare", "--preset", "smoke", "--methods", "temperature", "--output", str(output)]
    runs = output / "runs/smoke_arith"
    adapter_files = ("adapter_config.json", "adapter_model.safetensors", "method_state.safetensors", "method.json")
    try:
        assert main(command) == 0
        trained = load_file(runs / "map/seed-1/adapter_model.safetensors")
        recorded = (runs / "map/seed-1/predictions.jsonl").read_text()
        fitted = json.loads((runs / "temperature/seed-1/cost.json").read_text())["method_values"]["temperature"]
        for name in adapter_files:  # what a fresh clone of the committed grid lacks
            (runs / "map/seed-1" / name).unlink()
        for path in sorted((runs / "temperature/seed-1").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()

        rows = [json.loads(line) for line in recorded.splitlines()]
        rows[0]["probabilities"][0] += 0.01  # the recorded run and the retrained one disagree
        (runs / "map/seed-1/predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        capsys.readouterr()
        assert main(command) == 1
        printed = capsys.readouterr().out
        assert "map's unit kept its results but not its adapter; training it again" in printed
        assert "does not repeat the unit (test probabilities differ by up to 0.01 > 0.0001" in printed
        assert not (runs / "map/seed-1/adapter_model.safetensors").exists()
        assert not (runs / "temperature/seed-1/cost.json").exists()

        (runs / "map/seed-1/predictions.jsonl").write_text(recorded)
        assert main(command) == 0
        rebuilt = load_file(runs / "map/seed-1/adapter_model.safetensors")
        assert rebuilt.keys() == trained.keys() and all(torch.equal(rebuilt[k], trained[k]) for k in trained)
        assert all((runs / "map/seed-1" / name).is_file() for name in adapter_files)
        assert json.loads((runs / "map/seed-1/rebuilt.json").read_text())["max_probability_difference"] == 0.0
        assert not (runs / "map/seed-1/rebuild").exists()
        assert (runs / "map/seed-1/predictions.jsonl").read_text() == recorded
        assert json.loads((runs / "temperature/seed-1/cost.json").read_text())["method_values"]["temperature"] == fitted
    finally:
        torch.set_num_threads(threads)
