"""The load test's command line: the options, their bounds, and what each scenario
takes by default; ``parse_args`` exits with status 2 on bad usage."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from yarl import URL

from scripts.loadtest.characters import CHARACTERS_PER_DIRECTORY
from scripts.loadtest.roles import reloader_count
from scripts.loadtest.server import is_loopback

DEFAULT_URL = "ws://127.0.0.1:8000/v1/realtime?model=loadtest"
SCENARIOS = ("capacity", "reload-storm", "churn")
DEFAULTS: dict[str, dict[str, float]] = {
    "capacity": {"sessions": 300, "ramp": 5.0},
    "reload-storm": {"sessions": 200, "ramp": 20.0},
    "churn": {"sessions": 8, "ramp": 50.0},
}
MAX_SESSIONS = 2000
MAX_CYCLES = 100_000
MAX_DURATION = 3600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.loadtest",
        description="Load-test a Troupe server: concurrent sessions streaming speech in "
        "real time, reload storms with an isolation check, connect/reload/disconnect "
        "churn. Prints a summary against the budgets of DESIGN.md section 8 and writes "
        "a JSON file and an HTML page of charts.",
        epilog="Exit status: 0 within budgets; 1 a budget or the isolation check failed, "
        "or no server; 2 bad usage. Example: make loadtest ARGS=\"--spawn-server "
        "--scenario capacity --sessions 300\"",
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="reload-storm",
                        help="what to run (default: %(default)s)")
    parser.add_argument("--sessions", type=_count(MAX_SESSIONS), metavar="N",
                        help="sessions (capacity: the most to try, default 300; "
                        "reload-storm: all of them, default 200; churn: concurrent "
                        f"cycles, default 8); at most {MAX_SESSIONS}")
    parser.add_argument("--duration", type=_seconds, default=30.0, metavar="SECONDS",
                        help="capacity: hold after the last session joined; reload-storm: "
                        "calm and storm phases together; churn: the time limit (default: "
                        "%(default)g)")
    parser.add_argument("--ramp", type=_rate, metavar="PER_SECOND",
                        help="sessions joining a second (default: capacity 5, "
                        "reload-storm 20)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help=f"a running server's realtime WebSocket, with ?model= (default: "
                       f"{DEFAULT_URL})")
    where.add_argument("--spawn-server", action="store_true",
                       help="start the server and fake backends on 127.0.0.1 for this run")
    parser.add_argument("--characters-root", type=Path, metavar="DIR",
                        help="with --url: a directory inside one of the server's "
                        "--allowed-root, where the generated character directories go")
    # Refused below: a secret on the command line is readable in /proc/<pid>/cmdline.
    parser.add_argument("--admin-token", nargs="?", const="", help=argparse.SUPPRESS)
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="accept a --url that is not a loopback address")
    parser.add_argument("--reload-fraction", type=_fraction, default=0.1, metavar="F",
                        help="reload-storm: share of sessions that reload (default: "
                        "%(default)g)")
    parser.add_argument("--reload-rate", type=_non_negative, default=1.0,
                        metavar="PER_SECOND",
                        help="reload-storm: reloads a second per reloading session, 0 for "
                        "back to back (default: %(default)g)")
    parser.add_argument("--cycles", type=_count(MAX_CYCLES), default=10_000, metavar="N",
                        help="churn: connect/reload/disconnect cycles (default: %(default)s)")
    parser.add_argument("--characters", type=_count(100), default=CHARACTERS_PER_DIRECTORY,
                        metavar="N", help="characters per generated directory (default: "
                        "%(default)s, as the reload budget's)")
    parser.add_argument("--wav", type=Path, metavar="FILE",
                        help="speech to stream instead of the synthesised phrases, for "
                        "the question and the interruption (any rate and channels); "
                        "--spawn-server's fake STT hears the question's words spread over "
                        "its voiced part")
    parser.add_argument("--no-interruptions", dest="interruptions", action="store_false",
                        help="never speak over the character's reply (by default sessions "
                        "interrupt twice a cycle, as people do)")
    parser.add_argument("--no-compression", dest="compression", action="store_false",
                        help="do not offer permessage-deflate (by default sessions offer "
                        "it, as browsers and the openai SDK's websockets do)")
    parser.add_argument("--audio-lead", type=_non_negative, default=0.5, metavar="SECONDS",
                        help="the server's --audio-lead (given to a spawned server; "
                        "default: %(default)g)")
    parser.add_argument("--timeout", type=_seconds, default=20.0, metavar="SECONDS",
                        help="longest wait for any one answer (default: %(default)g)")
    parser.add_argument("--seed", type=int, default=1, metavar="N",
                        help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="the JSON file (default: bench-results/loadtest-SCENARIO.json)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="the HTML page of charts (default: "
                        "bench-results/loadtest-SCENARIO.html)")
    parser.add_argument("--profile", type=Path, metavar="PATH",
                        help="record the server with py-spy while the load runs "
                        "(.svg flame graph, .json speedscope, else raw stacks)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="with --spawn-server: one more option for python -m server, "
                        "e.g. --server-arg=--sandbox-pool-size=4 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def _count(most: int) -> Any:
    def parse(value: str) -> int:
        number = int(value)
        if not 1 <= number <= most:
            raise argparse.ArgumentTypeError(f"must be between 1 and {most}, got {value}")
        return number
    parse.__name__ = "count"
    return parse


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= MAX_DURATION:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_DURATION:g}")
    return seconds


def _rate(value: str) -> float:
    rate = float(value)
    if not 0 < rate <= 500:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 500 a second")
    return rate


def _non_negative(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and complete the options; exits with status 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.scenario]
    args.sessions = args.sessions or int(defaults["sessions"])
    args.ramp = args.ramp or defaults["ramp"]
    args.json = args.json or Path("bench-results") / f"loadtest-{args.scenario}.json"
    args.plot = args.plot or Path("bench-results") / f"loadtest-{args.scenario}.html"
    if args.plot.suffix.lower() not in (".html", ".htm"):
        parser.error(f"--plot {args.plot}: the charts are an HTML page (inline SVG); "
                     "give a path ending in .html")
    if not args.spawn_server:
        args.url = args.url or DEFAULT_URL
        url = URL(args.url)
        if url.scheme not in ("ws", "wss") or not url.host or "model" not in url.query:
            parser.error(f"--url {args.url!r} must be ws://HOST:PORT/v1/realtime?model=NAME")
        if not is_loopback(args.url) and not args.allow_non_loopback:
            parser.error(f"--url {args.url!r} is not a loopback address; load tests stay on "
                         "this machine unless --allow-non-loopback")
        if needs_directories(args) and args.characters_root is None:
            parser.error(f"--scenario {args.scenario} against --url needs --characters-root "
                         "DIR, a directory inside one of the server's --allowed-root")
        if args.server_arg:
            parser.error("--server-arg only applies with --spawn-server")
    elif args.characters_root is not None:
        parser.error("--characters-root applies to --url; --spawn-server makes its own")
    if args.admin_token is not None:
        parser.error("--admin-token is not accepted: a secret on the command line can be "
                     "read by other processes; with --url, set TROUPE_ADMIN_TOKEN in this "
                     "script's environment instead")
    if args.characters_root is not None and not args.characters_root.is_dir():
        parser.error(f"--characters-root {args.characters_root} is not a directory")
    if args.wav is not None and not args.wav.is_file():
        parser.error(f"--wav {args.wav}: no such file")
    return args


def needs_directories(args: argparse.Namespace) -> bool:
    return args.scenario == "churn" or (
        args.scenario == "reload-storm"
        and reloader_count(args.sessions, args.reload_fraction) > 0)
