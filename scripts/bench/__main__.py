"""``python -m scripts.bench``: both parts of the benchmark (see ``scripts/bench``),
one table, and the figures as the last line of stdout, in JSON."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import types
from collections.abc import Sequence

from scripts import bench
from scripts.bench import reloads, voice
from scripts.bench.common import BenchError, log

Row = tuple[str, str, str, str]


def report(rows: Sequence[Row], figures: dict[str, float]) -> None:
    rows = [("figure", "value", "budget", "result"), *rows]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print(json.dumps(figures), flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("characters", "voice"), default=None,
                        help="run one part: the reload, session start and memory figures "
                        "(characters) or the voice loop (voice; see scripts/bench/voice.py); "
                        "default: both")
    parser.add_argument("--reloads", type=int, default=200, metavar="N",
                        help="measured reloads, and in-process loads (default: 200)")
    parser.add_argument("--session-starts", type=int, default=100, metavar="N",
                        help="measured session starts (default: 100)")
    parser.add_argument("--idle-sessions", type=int, default=50, metavar="N",
                        help="sessions held open for the memory figure (default: 50)")
    voice.add_arguments(parser)
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the clean-up of each part


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rows: list[Row] = []
    figures: dict[str, float] = {}
    try:
        if args.only in (None, "characters"):
            results = reloads.run(args)
            rows += reloads.table(results)
            figures |= results.figures()
        if args.only in (None, "voice"):
            measured = voice.run(args)
            rows += measured.rows()
            figures |= measured.figures()
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    report(rows, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
