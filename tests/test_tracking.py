"""`--report-to`: the tracker receives exactly the records of train_log.jsonl; bad choices are usage errors."""

from __future__ import annotations

import json

import pytest

from bayeslora import tracking
from bayeslora.cli import build_parser, main
from bayeslora.compare import resolve_grid
from tests.test_train_cli import command, files  # noqa: F401 (fixture)
from tests.test_train_loop import one_thread  # noqa: F401 (fixture)

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every TensorBoard event file under `folder`."""
    scalars: dict[str, dict[int, float]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = event_accumulator.EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return scalars


@pytest.mark.parametrize("method, prefixes", [("bayeslora", [""]), ("ensemble", ["member-0/", "member-2/"])])
def test_tensorboard_gets_the_train_log_records_and_validation_nll(files, tmp_path, method, prefixes):
    output = tmp_path / "run"
    arguments = command(files, output, "--report-to", "tensorboard", "--no-zero-shot")
    arguments[arguments.index("--method") + 1] = method
    assert main(arguments) == 0
    logged = tensorboard_scalars(output / "tracking")
    for prefix in prefixes:
        log = output / prefix / "train_log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(records) == 3 and "validation" in records[-1]
        for record in records:
            numbers = flatten(record)
            assert "validation/validation_nll" in numbers or "validation" not in record
            for key, value in numbers.items():
                assert logged[prefix + key][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), key
        assert set(logged) >= {prefix + key for key in flatten(records[-1])}


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """The test's own flattening of a nested record: numbers only, names joined with '/'."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif type(value) in (int, float):
            flat[prefix + key] = value
    return flat


def test_report_to_is_checked_and_does_not_define_the_run(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", lambda: False)
    assert main(command(files, tmp_path / "run", "--report-to", "wandb")) == 2
    assert capsys.readouterr().err.strip().endswith("--report-to wandb needs the wandb package: pip install wandb")
    assert not (tmp_path / "run").exists()
    grid = resolve_grid(build_parser().parse_args(["compare", "--preset", "smoke", "--output", str(tmp_path / "grid"),
                                                   "--report-to", "tensorboard"]))
    settings = grid.settings("smoke_arith", "mle", 1)
    assert settings.report_to == "tensorboard" and "report_to" not in settings.run_identity()
    assert "report_to" not in grid.identity()


def test_compare_units_report_to_their_own_tracker_run(tmp_path):
    output = tmp_path / "grid"
    assert main(["compare", "--preset", "smoke", "--methods", "mle", "--output", str(output),
                 "--report-to", "tensorboard"]) == 0
    unit = output / "runs" / "smoke_arith" / "mle" / "seed-1"
    logged = tensorboard_scalars(unit / "tracking")
    records = [json.loads(line) for line in (unit / "train_log.jsonl").read_text().splitlines()]
    assert records and {record["step"]: record["nll"] for record in records} == pytest.approx(logged["nll"])
