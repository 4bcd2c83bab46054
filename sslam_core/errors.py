"""The one error type of the library: every domain error is an `SslamError`.

Its message is one line that names what is wrong and where (a file, an option, a line of a label
file). The command line prints it as `error: MESSAGE` and exits with status 2, in one place (the
`sslam` group in `sslam_cli.main`), so a command never needs its own list of exceptions to catch;
library users catch `SslamError` to handle every expected failure at once. Subclasses keep the
built-in base they had (ValueError, OSError, ImportError, ...) so that older `except` clauses still
match.
"""

from __future__ import annotations


class SslamError(Exception):
    """Base of every expected failure: bad input, a refused checkpoint, an unwritable output, ..."""

    exit_code = 2


class OptionError(SslamError, ValueError):
    """A setting out of range or of the wrong form: a window, a layer, a threshold, a granularity."""


__all__ = ["OptionError", "SslamError"]
