"""The scripts' entry point: an error the user can fix (a missing file, a bad flag or config value) is one line on
stderr and exit status 2, as argparse reports a bad flag; anything else keeps its traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

# what the sampling and evaluation scripts raise for their input: PipelineError, ConfigError, DiffusersFormatError,
# ExportError and the Inception weights' error are ValueError or FileNotFoundError subclasses
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def run_cli(main: Callable[[], object], expected: tuple[type[BaseException], ...] = INPUT_ERRORS) -> None:
    """Call main(); an `expected` error prints '<script>: error: <message>' and exits with status 2."""
    try:
        main()
    except expected as err:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {err}\n")
        raise SystemExit(2) from None
