"""The learning, ablation, sound-event and fidelity checks, with the data and command helpers they share.

Each check is a module with `main(argv=None)`, run through its wrapper in scripts/ with the command
line the docs give (`python scripts/learning_check.py DATA_ROOT ...`). The package is imported from
the scripts folder, which Python puts on the import path for any script run from it; the checks
import each other relatively, and `benchmarks` (precision_fidelity: torch int8, the machine line) by
name.
"""
