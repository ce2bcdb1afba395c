"""``python -m scripts.chaos`` (``make chaos``): the phases in one run, a row each as
it ends, and a summary line; exit status 1 if any phase left something behind."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from scripts import chaos
from scripts.chaos.phase import HEADER, Row
from scripts.chaos.phases import backend_phases, embedded_phase, sandbox_phases, sigterm_phase
from scripts.chaos.stage import Stage


async def main_async(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="troupe-chaos-") as tmp:
        root = Path(tmp)
        stage = Stage(root)
        await stage.start_fakes()
        try:
            print(HEADER, flush=True)
            await stage.start_server(**stage.urls)
            await backend_phases(stage, args, rows)
            await sandbox_phases(stage, args, rows)
            await stage.stop_server()
            if not args.no_embedded:
                await embedded_phase(root, args, rows)
            await sigterm_phase(stage, args, rows)
        finally:
            await stage.close()
    left = [row.name for row in rows if any(
        isinstance(value, int) and value for value in (row.procs, row.fds, row.series))]
    print(f"\n{len(rows)} phases in {time.monotonic() - started:.0f} s; leftovers in: "
          f"{', '.join(left) or 'none'}")
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    # prog: as argparse named it when this was scripts/chaos.py, so --help reads the same
    parser = argparse.ArgumentParser(prog="chaos.py",
                                     description=(chaos.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="faults injected per phase")
    parser.add_argument("--only", default="", help="phases whose name contains one of "
                        "these comma-separated words (e.g. llm,sandbox-kill)")
    parser.add_argument("--no-embedded", action="store_true",
                        help="skip the embedded models' phase (it loads real models)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "chaos.log",
                        help="the server's log (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, filemode="w", level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"server log: {args.log}", flush=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
