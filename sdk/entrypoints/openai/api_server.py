"""`python -m kvloom.entrypoints.openai.api_server --model M ...`: vLLM's module entry point, `kvloom serve`'s flags."""

from __future__ import annotations

import argparse
import sys

from kvloom.cli import _serve, add_serve_args, run
from kvloom.entrypoints.openai.cli_args import normalize_flag_names


def make_arg_parser() -> argparse.ArgumentParser:
    """The module's parser: `kvloom serve`'s flags, the model given with --model (as vLLM's module takes it)."""
    parser = argparse.ArgumentParser(
        prog="python -m kvloom.entrypoints.openai.api_server",
        usage="%(prog)s --model MODEL [flags]",
        description="Run the OpenAI-compatible server (the flags of `kvloom serve` and vLLM's `vllm serve`).",
    )
    add_serve_args(parser)
    parser.set_defaults(command="serve", model=None, func=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run(make_arg_parser().parse_args(normalize_flag_names(list(argv))))


if __name__ == "__main__":
    main()
