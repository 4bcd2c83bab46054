"""The benchmarks, one entry point: `python scripts/bench.py TARGET [options]`.

Each target times the project's code against a baseline run in the same process (same weights, same
load; the timing helper and the machine line of `benchmarks.common`), prints the CPU capability it ran
with first, then its figures and the ratio. `python scripts/bench.py TARGET --help` lists a target's
options; docs/benchmarks.md has the figures measured with the defaults.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from benchmarks import cpu_backends, encoder, extract, finetune, frontend, pretrain, scale, search

TARGETS: dict[str, ModuleType] = {
    "frontend": frontend,
    "encoder": encoder,
    "extract": extract,
    "pretrain": pretrain,
    "finetune": finetune,
    "scale": scale,
    "cpu-backends": cpu_backends,
    "search": search,
}


def parser() -> argparse.ArgumentParser:
    """The entry point's parser: one sub-command per target, with that target's own options."""
    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=raw)
    targets = top.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, module in TARGETS.items():
        doc = module.__doc__ or name
        sub = targets.add_parser(name, help=doc.splitlines()[0], description=doc, formatter_class=raw)
        module.add_arguments(sub)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    module = TARGETS[vars(args).pop("target")]  # the target's options only: pretrain prints them
    module.run(args)


if __name__ == "__main__":
    main()
