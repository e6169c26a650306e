"""The `hybridinfer` command: one entry point, a module per sub-command, one-line errors."""

import argparse
import sys

from hybridinfer.commands import bench, calibrate, convert, perplexity, profile, run, sparsity
from hybridinfer.errors import EXIT_INTERRUPTED, HybridInferError

COMMANDS = {"run": run, "perplexity": perplexity, "bench": bench, "profile": profile, "convert": convert,
            "calibrate": calibrate, "sparsity": sparsity}


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end as every other error does: one `error:` line, exit status 1."""

    def error(self, message: str):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="hybridinfer", description="Sparse-activation LLM inference on GGUF files.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].main(args) or 0
    except HybridInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
