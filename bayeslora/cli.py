"""The `bayeslora` command line: parse, call, report.

Each sub-command lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`. Bad input surfaces as a
`UsageError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bayeslora.errors import UsageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "evaluate": ("bayeslora.evaluate", "score a model (+ adapter) on a task: accuracy, ECE, MCE, NLL, Brier, reliability diagram"),
    "train": ("bayeslora.experiment", "fine-tune an adapter with a method (ELBO for bayeslora), then evaluate it"),
    "compare": ("bayeslora.compare", "every (task, method, seed) on the shared path; ACC / ECE / NLL and cost tables"),
    "inspect": ("bayeslora.inspect_run", "is a run's posterior doing anything? scales, KL parts, update sizes, mutual information"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage; keep it to one line
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bayeslora", description="Bayesian-LoRA fine-tuning and calibrated evaluation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(commands.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except UsageError as error:
        print(f"bayeslora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
