"""Progress bars for long commands: shown only on a terminal and when verbosity > 0."""

import sys

from tqdm import tqdm


def progress(total: int | None, desc: str, *, verbosity: int = 1, stream=None, unit: str = "rows"):
    """A tqdm bar on stderr, disabled when stderr is not a terminal (as `dumpdata` does)."""
    stream = stream or sys.stderr
    enabled = verbosity > 0 and hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=True, file=stream, disable=not enabled
    )
