"""One table over the runs of a sweep: ``python -m hymtl.summarize outputs/multirun/<date>/<time>``.

Writes ``summary.csv`` (one row per run) and ``summary.md`` (the runs, then the mean ± sample
standard deviation over each group of runs that differ only by seed or fold) into the folder
and prints the Markdown. The same runs by itself at the end of every multirun. The service is
:mod:`hymtl.summaries`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hymtl.errors import first_line, user_error
from hymtl.summaries import SweepSummary, summarize  # noqa: F401 (SweepSummary: its name before hymtl.summaries)


def main(argv: Sequence[str] | None = None) -> int:
    """The command: the Markdown on stdout and 0, or one ``error: ...`` line and 2."""
    parser = argparse.ArgumentParser(
        prog="python -m hymtl.summarize",
        description="Summarise the runs below DIR (a multirun folder): summary.csv + summary.md, printed.",
    )
    parser.add_argument("dir", metavar="DIR", help="e.g. outputs/multirun/2026-01-01/12-00-00")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.dir, write=not args.no_write))
    except Exception as exc:
        error = user_error(exc)
        if error is None:  # a bug: the traceback is the report
            raise
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
