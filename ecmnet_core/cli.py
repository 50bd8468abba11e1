"""ecmnet-core (or python -m ecmnet_core): one entry point, one module per sub-command.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` (and may define
``legacy_argv(argv)`` to accept spellings of earlier releases); modules are imported only when their command runs,
so ``--help`` stays fast.

Exit status, the same for every command: 0 done; 2 bad input or usage (the message names the file, argument or
value to fix; argparse's own errors are 2 as well); 1 a failure while running on good input (training diverged, a
check that found a mismatch). A bad input a command can skip (an unreadable image among many) is reported and
counted, the rest is done, and the status is 2. Warnings are one line each: ``<command>: warning: <message>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("ecmnet_core.bench.cost", "parameters and GMac/GFLOPs of a model configuration"),
    "bench": ("ecmnet_core.bench.cli", "benchmarks: model, scan, inference, profile, train, points"),
    "train": ("ecmnet_core.train.cli", "train a model from a YAML config with command-line overrides"),
    "eval": ("ecmnet_core.evaluate", "evaluate a checkpoint on a dataset split (mIoU, per-class IoU)"),
    "predict": ("ecmnet_core.predict", "segment images, folders or videos"),
    "calibrate": ("ecmnet_core.calibrate", "fit a checkpoint's softmax temperature on a labelled split"),
    "pack": ("ecmnet_core.data.pack_cli", "pack a dataset split into tar shards"),
    "make-bag": ("ecmnet_core.bags.make_bag", "write a rosbag2 from an image folder or dataset split"),
    "replay": ("ecmnet_core.bags.replay", "evaluate a segmenter on a rosbag2 (offline, or live against a node)"),
    "export": ("ecmnet_core.engines.export", "export a model to ONNX for one input size"),
    "release": ("ecmnet_core.train.release", "strip training state from a checkpoint for shipping"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecmnet-core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if hasattr(module, "legacy_argv"):
        argv = module.legacy_argv(argv)
    args = build_parser(load=command).parse_args(argv)
    warnings.showwarning = _one_line(command)
    try:
        return int(module.run(args) or 0)
    except SystemExit as exc:  # commands stop on bad input with SystemExit("<command>: <what is wrong>")
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            exc.code = 2  # the exit status of bad input (Python's default for a message is 1)
        raise


def _one_line(command: str):
    """``warnings.showwarning`` for the command line: the message, no source line, no file path."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{command}: warning: {message}", file=file or sys.stderr)

    return show


if __name__ == "__main__":
    sys.exit(main())
