"""`soprano-onnx` command line: export, convert, speak, bench, serve, release."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from pipeline_lib.errors import SopranoOnnxError

# Each subcommand lives beside the code it drives: (module, add_arguments, run).
SUBCOMMANDS = {
    "export": ("pipeline_lib.export.command", "Export a checkpoint (local directory or hub id) to a self-contained ONNX folder."),
    "convert": ("pipeline_lib.convert_command", "Convert an export folder into one backend x precision target folder (lm/, decoder/) for the runtime."),
    "speak": ("pipeline_lib.runtime.command", "Synthesise speech from text with exported models."),
    "bench": ("pipeline_lib.bench.command", "Benchmark one backend configuration (RTF, per-stage times, memory)."),
    "serve": ("pipeline_lib.server.command", "Serve an OpenAI-compatible speech API (POST /v1/audio/speech) over HTTP."),
    "release": ("pipeline_lib.release", "Bundle ONNX targets with their certificates and a model card, ready for the Hugging Face hub."),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="soprano-onnx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("pipeline_lib"):
                continue  # subcommand not built in this version
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return int(run(args) or 0)
    except SopranoOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional package of an extra that is not installed
        if exc.name and exc.name.split(".")[0] == "pipeline_lib":
            raise
        print(f"error: the Python package {exc.name!r} is not installed; `soprano-onnx {args.command}` needs it: "
              "install the soprano-onnx extra that brings it (README: [serve] for serve, [export] for export, "
              "[openvino] for OpenVINO)", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the checks before the work could not foresee (a full disk, a race)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
