"""The targets of `python scripts/bench.py TARGET`, one module each, and what they share (`common`).

A target module has a docstring (its `--help`), `add_arguments(parser)` and `run(args)`. The package is
imported from the scripts folder, which Python puts on the import path for any script run from it.
"""
