"""Where does calibration come from? One seed of the `calibration` preset's run, one row per variant.

    python scripts/calibration_ablation.py                      # every row not finished yet, then the table
    python scripts/calibration_ablation.py --rows lora,bayeslora,bayeslora_paper
    python scripts/calibration_ablation.py --table-only
    python scripts/calibration_ablation.py --probe --rows lora,bayeslora,bayeslora_lm_head

Each row is one `bayeslora train` run with the preset's training settings (SmolLM2-135M, ARC-Easy cloze,
200 training questions x 10 epochs, lr 1e-3, the last epoch kept, 500 test questions) on the library's
default LoRA targets, q_proj and v_proj (the ablation was run before the preset adopted the released targets;
the rows marked "released targets" add lm_head, as every unit of the preset's grid now has), plus the row's
changes, written to docs/results/calibration-smollm2/ablation/<row>/ (only its small result files are
committed), then scored with the same adapter on the preset's out-of-distribution sets (<row>/eval/<task>/,
`bayeslora evaluate`); the rows `lora` and `bayeslora` are the seed-1 units of the q/v grid (grid-qv/, the
preset's grid before commit ebb56ca), run by `bayeslora compare` rather than twice. A finished row (results.json) is skipped and an interrupted one resumes from its
checkpoint, so the script can be rerun across sessions. The table (ablation.md next to the runs) has
ACC, ECE, NLL, the mean mutual information (also over wrong and right answers), the means under shift
and training seconds.

`--probe` runs the same rows at a third of the cost, for trying variants before a full run: 96 training
questions x 8 epochs, 50 validation and 150 test questions, every row (`lora` and `bayeslora` included)
a `train` run under docs/results/calibration-smollm2/ablation-probe/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bayeslora.files import write_atomically
from bayeslora.presets import PRESETS

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "calibration-smollm2"
#: the preset's grid on the q/v targets, run at commit 5172888 (its units `lora` and `bayeslora` are rows here)
GRID = RESULTS / "grid-qv"
PRESET = PRESETS["calibration"]
#: the targets every row has unless it sets its own (the library's default targets, those of `GRID`)
QV_TARGETS = {"target_modules": ["q_proj", "v_proj"]}
#: the probe size (`--probe`); short runs write no intermediate checkpoint
PROBE = {"limit_train": 96, "epochs": 8, "limit_validation": 50, "limit_eval": 150, "checkpoint_every": 1000}
RELEASED_AIDS = {"label_smoothing": {"label_smoothing": 0.05}, "entropy_bonus": {"entropy_bonus": 0.05}}
#: the released code's LoRA targets, for every method of a row that sets them
RELEASED_TARGETS = {"target_modules": ["q_proj", "v_proj", "lm_head"]}
#: five times the preset's training questions for a fifth of its epochs (the same optimizer steps)
MORE_QUESTIONS = {**RELEASED_TARGETS, "limit_train": 1000, "epochs": 2}

#: row -> (what it is, method, method options, training settings changed from the preset's)
ROWS: dict[str, tuple[str, str, dict, dict]] = {
    "lora": ("plain LoRA (mle)", "mle", {}, {}),
    "lora_label_smoothing": ("LoRA + label smoothing 0.05", "mle", {}, RELEASED_AIDS["label_smoothing"]),
    "lora_entropy_bonus": ("LoRA + entropy bonus 0.05", "mle", {}, RELEASED_AIDS["entropy_bonus"]),
    "lora_dropout_at_evaluation": ("LoRA, dropout 0.05 left on at evaluation (4 masks)", "mcdropout", {"dropout": 0.05}, {}),
    "bayeslora": ("Bayesian-LoRA, library defaults", "bayeslora", {}, {}),
    "bayeslora_label_smoothing": ("Bayesian-LoRA + label smoothing 0.05", "bayeslora", {}, RELEASED_AIDS["label_smoothing"]),
    "bayeslora_entropy_bonus": ("Bayesian-LoRA + entropy bonus 0.05", "bayeslora", {}, RELEASED_AIDS["entropy_bonus"]),
    "bayeslora_dropout_at_evaluation": ("Bayesian-LoRA, LoRA dropout 0.05 left on at evaluation", "bayeslora",
                                        {"dropout_at_evaluation": True}, {"lora_dropout": 0.05}),
    "bayeslora_released_kl": ("Bayesian-LoRA, released KL weighting (0.1 KL / batches, from epoch 3)", "bayeslora",
                              {}, {"kl_weighting": "released"}),
    # each changed default, reverted on its own
    "bayeslora_all_bayesian": ("Bayesian-LoRA, v_proj Bayesian too (no plain LoRA path)", "bayeslora",
                               {"bayesian_modules": ["q_proj", "v_proj"]}, {}),
    "bayeslora_prior_sd_0.1": ("Bayesian-LoRA, prior_sd 0.1 (published)", "bayeslora", {"prior_sd": 0.1}, {}),
    "bayeslora_small_scales": ("Bayesian-LoRA, lambda and q0 sd initialised at 1e-3 (published)", "bayeslora",
                               {"lambda_init": 1e-3, "sd_init": 1e-3}, {}),
    "bayeslora_published_caps": ("Bayesian-LoRA, caps lambda 0.03 and q0 sd 0.1 (published), initialised there",
                                 "bayeslora", {"lambda_init": 0.03, "max_lambda": 0.03, "sd_init": 0.1, "max_sd_u": 0.1}, {}),
    "bayeslora_scale_lr_1": ("Bayesian-LoRA, scales at the base learning rate", "bayeslora", {"scale_lr": 1.0}, {}),
    "bayeslora_posterior_wd": ("Bayesian-LoRA, weight decay 0.01 on the posterior too", "bayeslora",
                               {"posterior_weight_decay": 0.01}, {}),
    # variants tried while looking for a posterior that carries the fit (docs/results/calibration-smollm2.md)
    "bayeslora_lm_head": ("Bayesian-LoRA, lm_head a Bayesian target too (the released targets)", "bayeslora",
                          {"bayesian_modules": ["q_proj", "lm_head"]}, RELEASED_TARGETS),
    "lora_lm_head": ("plain LoRA (mle) with lm_head a target too (the released targets)", "mle", {}, RELEASED_TARGETS),
    # a post-hoc row names the row whose trained adapter it fits (`adapter_from`)
    "temperature_lm_head": ("temperature scaling of `lora_lm_head`'s adapter (fitted on the validation questions)",
                            "temperature", {}, {**RELEASED_TARGETS, "adapter_from": "lora_lm_head"}),
    "bayeslora_lambda_0.3": ("Bayesian-LoRA, lambda 0.3 (the previous default)", "bayeslora",
                             {"lambda_init": 0.3, "max_lambda": 0.3}, {}),
    "bayeslora_lambda_0.3_lm_head": ("Bayesian-LoRA, lambda 0.3, lm_head a Bayesian target too", "bayeslora",
                                     {"lambda_init": 0.3, "max_lambda": 0.3, "bayesian_modules": ["q_proj", "lm_head"]},
                                     RELEASED_TARGETS),
    "bayeslora_lambda_0.6_lm_head": ("Bayesian-LoRA, lambda 0.6, lm_head a Bayesian target too", "bayeslora",
                                     {"lambda_init": 0.6, "max_lambda": 0.6, "bayesian_modules": ["q_proj", "lm_head"]},
                                     RELEASED_TARGETS),
    "bayeslora_lm_head_mean_lr_10": ("Bayesian-LoRA, lm_head a Bayesian target too, inducing means at 10 x the learning rate",
                                     "bayeslora", {"bayesian_modules": ["q_proj", "lm_head"], "mean_lr": 10.0},
                                     RELEASED_TARGETS),
    "bayeslora_lm_head_learned_prior_lambda": ("Bayesian-LoRA, lm_head a Bayesian target too, lambda's prior scale learned "
                                               "(empirical Bayes)", "bayeslora",
                                               {"bayesian_modules": ["q_proj", "lm_head"], "learn_prior_lambda": True},
                                               RELEASED_TARGETS),
    "bayeslora_lm_head_prior_sd_3_learned_prior_lambda": (
        "Bayesian-LoRA, lm_head a Bayesian target too, prior_sd 3, lambda's prior scale learned", "bayeslora",
        {"bayesian_modules": ["q_proj", "lm_head"], "prior_sd": 3.0, "learn_prior_lambda": True}, RELEASED_TARGETS),
    "bayeslora_lm_head_inducing_spread": (
        "Bayesian-LoRA, lm_head a Bayesian target too, lambda's prior scale learned, lambda started at 0.05 "
        "(the draws' spread from q(U))", "bayeslora",
        {"bayesian_modules": ["q_proj", "lm_head"], "learn_prior_lambda": True, "lambda_init": 0.05}, RELEASED_TARGETS),
    "bayeslora_lm_head_noise_scales": (
        "Bayesian-LoRA, lm_head a Bayesian target too, conditional noise scaled per row and column (noise_scales)",
        "bayeslora", {"bayesian_modules": ["q_proj", "lm_head"], "noise_scales": True}, RELEASED_TARGETS),
    "bayeslora_lm_head_noise_scales_scale_lr_100": (
        "Bayesian-LoRA, lm_head a Bayesian target too, noise scales per row and column, scales at 100 x the "
        "learning rate (so that the data can move them far in 96 steps)", "bayeslora",
        {"bayesian_modules": ["q_proj", "lm_head"], "noise_scales": True, "scale_lr": 100.0}, RELEASED_TARGETS),
    # no plain LoRA target next to the Bayesian ones: the fit must go through the posterior (or not happen)
    "bayeslora_only_bayesian_targets": (
        "Bayesian-LoRA on q_proj and lm_head only, both Bayesian (no plain LoRA path)", "bayeslora",
        {"bayesian_modules": ["q_proj", "lm_head"]}, {"target_modules": ["q_proj", "lm_head"]}),
    # more questions at the same 250 optimizer steps: does the learned posterior matter more when the data say more?
    "bayeslora_lm_head_1000_questions": (
        "Bayesian-LoRA, lm_head a Bayesian target too, 1,000 training questions x 2 epochs (the same 250 steps)",
        "bayeslora", {"bayesian_modules": ["q_proj", "lm_head"]}, MORE_QUESTIONS),
    "lora_lm_head_1000_questions": (
        "plain LoRA (mle) with lm_head a target too, 1,000 training questions x 2 epochs (the same 250 steps)",
        "mle", {}, MORE_QUESTIONS),
    "bayeslora_lambda_0.6": ("Bayesian-LoRA, lambda 0.6", "bayeslora", {"lambda_init": 0.6, "max_lambda": 0.6}, {}),
    "bayeslora_all_bayesian_prior_sd_0.3": ("Bayesian-LoRA, v_proj Bayesian too, prior_sd 0.3, lambda 0.3", "bayeslora",
                                            {"bayesian_modules": ["q_proj", "v_proj"], "prior_sd": 0.3,
                                             "lambda_init": 0.3, "max_lambda": 0.3}, {}),
    "bayeslora_paper": ("Bayesian-LoRA, published constants, q_proj Bayesian and v_proj plain (as released)",
                        "bayeslora", {"constants": "paper", "bayesian_modules": ["q_proj"], "posterior_weight_decay": 0.01},
                        {}),
}
#: rows that are units of the q/v grid (seed 1), run by `bayeslora compare` there, not twice
GRID_UNITS = {"lora": "mle", "bayeslora": "bayeslora"}


def root(probe: bool) -> Path:
    return RESULTS / ("ablation-probe" if probe else "ablation")


def row_dir(row: str, probe: bool) -> Path:
    if row in GRID_UNITS and not probe:
        return GRID / "runs" / PRESET["tasks"][0] / GRID_UNITS[row] / f"seed-{PRESET['seeds'][0]}"
    return root(probe) / row


def settings(row: str, probe: bool) -> dict:
    _, method, options, changes = ROWS[row]
    if "adapter_from" in changes:
        changes = {**changes, "adapter_from": str(row_dir(changes["adapter_from"], probe))}
    return {**PRESET["train"], **QV_TARGETS, **(PROBE if probe else {}), "model": PRESET["model"], "task": PRESET["tasks"][0],
            "method": method, "method_options": options, "seed": PRESET["seeds"][0], "zero_shot": False, **changes}


def run_row(row: str, probe: bool) -> None:
    output = row_dir(row, probe)
    if (output / "results.json").is_file():
        print(f"{row}: finished earlier, reused", flush=True)
    else:
        train_row(row, probe, output)
    if not probe:
        evaluate_under_shift(row, output)


def train_row(row: str, probe: bool, output: Path) -> None:
    if row in GRID_UNITS and not probe:
        sys.exit(f"{row}: the {GRID_UNITS[row]} unit of {GRID} is not finished; it is a unit of the preset's q/v grid, "
                 f"rerun by `bayeslora compare --preset calibration --methods {GRID_UNITS[row]} --seeds 1 --output "
                 f"{GRID}` at commit 5172888")
    resume = any(output.glob("**/checkpoints/latest"))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
        yaml.safe_dump(settings(row, probe), config)
        command = [sys.executable, "-m", "bayeslora", "train", "--config", config.name, "--output", str(output),
                   "--resume" if resume else "--overwrite"]
        print(f"{row}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)


def evaluate_under_shift(row: str, output: Path) -> None:
    """The preset's out-of-distribution test sets, scored with the row's trained adapter (as the grid's units are)."""
    for task in PRESET["ood_tasks"]:
        target = output / "eval" / task
        if (target / "results.json").is_file():
            continue
        command = [sys.executable, "-m", "bayeslora", "evaluate", "--adapter", str(output), "--task", task,
                   "--limit", str(PRESET["train"]["limit_eval"]), "--output", str(target), "--overwrite"]
        print(f"{row}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)


def row_summary(row: str, probe: bool) -> dict | None:
    output = row_dir(row, probe)
    if not (output / "results.json").is_file():
        return None
    results = json.loads((output / "results.json").read_text())
    training = json.loads((output / "training.json").read_text())
    shifted = [output / "eval" / task / "results.json" for task in PRESET["ood_tasks"]]
    shift = {}
    if all(path.is_file() for path in shifted):  # the mean over the out-of-distribution sets, as compare's tables
        values = [json.loads(path.read_text()) for path in shifted]
        shift = {f"shift_{key}": sum(v[key] for v in values) / len(values)
                 for key in ("accuracy_percent", "ece_percent", "nll", "mutual_information")}
    return {"row": row, "description": ROWS[row][0], **{key: results.get(key) for key in (
        "accuracy_percent", "ece_percent", "nll", "mutual_information", "mutual_information_wrong",
        "mutual_information_right", "n_examples", "n_samples")},
        "train_seconds": training.get("train_seconds"), **shift}


def write_table(rows: list[str], probe: bool) -> Path:
    summaries = [summary for row in rows if (summary := row_summary(row, probe)) is not None]

    def number(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    shift = "" if probe else " shift: ACC / ECE / NLL / MI |"
    lines = ["| row | ACC (%) | ECE (%) | NLL (nats) | MI (nats) | MI wrong / right |" + shift + " training (s) |",
             "|---|---:|---:|---:|---:|---:|" + ("" if probe else "---:|") + "---:|"]
    for s in summaries:
        shifted = "" if probe else (" – |" if "shift_ece_percent" not in s else
                                    f" {s['shift_accuracy_percent']:.1f} / {s['shift_ece_percent']:.1f} / "
                                    f"{s['shift_nll']:.3f} / {number(s['shift_mutual_information'], '.2g')} |")
        lines.append(f"| {s['description']} (`{s['row']}`) | {number(s['accuracy_percent'], '.1f')} | "
                     f"{number(s['ece_percent'], '.1f')} | {number(s['nll'], '.3f')} | "
                     f"{number(s['mutual_information'], '.2g')} | {number(s['mutual_information_wrong'], '.2g')} / "
                     f"{number(s['mutual_information_right'], '.2g')} |{shifted} {number(s['train_seconds'], '.0f')} |")
    target = root(probe) / "ablation.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, "\n".join(lines) + "\n")
    write_atomically(target.parent / "ablation.json", json.dumps(summaries, indent=1) + "\n")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from finished rows")
    parser.add_argument("--probe", action="store_true", help="the rows at probe size (96 x 8 epochs, 150 test questions)")
    args = parser.parse_args()
    rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; valid rows: {', '.join(ROWS)}")
    if not args.table_only:
        for row in rows:
            run_row(row, args.probe)
    print(f"wrote {write_table(list(ROWS), args.probe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
