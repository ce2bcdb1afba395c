"""Troupe benchmark: the DESIGN.md §8 figures that ``make bench`` measures, and the
voice loop's latencies (``scripts/bench_voice.py``).

Run as ``python -m scripts.bench`` (``make bench``; ``ARGS=--help`` for the counts;
``--only characters`` or ``--only voice`` for one part). A run takes about two
minutes on the 2-core dev machine (the characters part 15 s), binds
127.0.0.1 only and removes everything it starts. Progress goes to stderr; stdout gets
a table and, as its very last line, one JSON object with ``reload_p50_ms``,
``reload_p99_ms``, ``inprocess_p50_ms``, ``ratio_p50``, ``session_start_p50_ms`` and
``idle_session_mb``, then the ``voice_*`` figures (see ``bench_voice.VoiceResults``).
Budget misses are shown, not fatal: the exit code is 0 for a completed run and 1 when
something broke (a failed reload, a server that did not start, a leftover process, a
turn that got no reply).

What the characters part measures, and how:

- Input: two generated directories of 20 realistic character files each (the Unmute
  fork's format, prompt helpers from ``unmute.llm.system_prompt``, two files per
  directory with TOOLS), so every reload loads other files than the one before.
- The real server runs as a subprocess (``python -m server`` on a free loopback port,
  its log in a temp file), so this client never competes for the server's event loop.
- Reload: one WebSocket session, 10 warm-up reloads, then N back to back, alternating
  the directories; the time from sending ``session.characters.reload`` to receiving
  ``session.characters.reloaded``, each of which must report 20 loaded and 0 errors.
  The server's own ``duration_ms`` is shown beside it.
- In-process baseline: the same N loads in this process, the way the Unmute fork loads
  characters (per file ``spec_from_file_location`` + ``module_from_spec`` +
  ``exec_module``, required attributes checked, ``PromptGenerator`` instantiated), with
  the directory importable as the package ``characters`` and the prompt shim on
  ``sys.path``; the modules are dropped between loads so each load executes the files
  again. Python's default bytecode caching applies (the warm-up writes ``__pycache__``,
  the measured loads read it), as it would for a server importing characters itself;
  the same loads compiling from source every time are shown beside it. The sandbox
  has its own cache of compiled files (``sandbox/codecache.py``), warmed the same way.
  Ratio = reload p50 / in-process p50 with bytecode cached.
- Session start: N times, open a new session and time until ``session.created`` has
  arrived and a ``session.characters.list`` (the bundled default set, which the
  session's sandbox loads first) is answered; then close it. The time to
  ``session.created`` alone is shown beside it.
- Idle session memory: PSS (``/proc/<pid>/smaps_rollup``) of the server process and of
  every process below it (the zygote and the sandbox children), before and after
  opening K sessions that have each listed their characters, with the pool refilled
  and no retired sandbox alive both times; the delta divided by K. Also the median PSS
  of the sessions' own sandbox children (their pids from the admin API). 1 MB = 1 MiB.

Between phases the run waits until the server is idle: sessions closed, pool full, no
retired child running (counted in /proc). At the end it warns when ``/v1/health``
counts more live children than run, and it fails when a process the server started
outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import importlib.util
import json
import os
import pprint
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

REPO = Path(__file__).resolve().parent.parent
SHIMS = REPO / "sandbox" / "shims"
PACKAGE = "characters"
CHARACTER_COUNT = 20
RELOAD_WARMUP = 10
START_WARMUP = 5
TIMEOUT = 30.0
"""Seconds any single wait may take before the run counts as broken."""
SETTLE_POLL = 0.1
"""Seconds between the health polls that decide the server is idle."""

BUDGETS = {
    "reload_p50_ms": 30.0,
    "reload_p99_ms": 100.0,
    "ratio_p50": 3.0,
    "session_start_p50_ms": 20.0,
    "idle_session_mb": 10.0,
}


class BenchError(Exception):
    """Something broke: the run cannot produce trustworthy figures."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ── character directories ────────────────────────────────────────────────────

# (role, background, topics): what each generated character is built from.
PERSONAS: list[tuple[str, str, str]] = [
    ("a retired sea captain who now runs a harbour café",
     "You sailed cargo ships between Rotterdam and Singapore for thirty years.",
     "ports, storms, knots and the regulars who drink your coffee"),
    ("a patient piano teacher with forty years of pupils",
     "You believe anyone can learn to play if they practise ten minutes a day.",
     "scales, favourite composers, stage fright and how to practise"),
    ("a mountain rescue volunteer in the Scottish Highlands",
     "You have carried more lost walkers down in the fog than you can count.",
     "weather, maps, kit lists and the right way to read a ridge"),
    ("the guide of a crumbling medieval castle",
     "You know every legend of the place and half of them are true.",
     "sieges, secret passages, castle food and the ghost in the west tower"),
    ("the host of a late-night radio call-in show",
     "You have a soft voice and an old record collection, and you hate silence.",
     "old songs, insomnia, callers' confessions and the city at night"),
    ("a beekeeper with sixty hives on a hillside",
     "You talk to your bees every morning and swear they answer.",
     "honey, swarms, flowers, stings and the seasons of a hive"),
    ("a street-food chef with a famous noodle stall",
     "You cook for three hundred people a night from a cart no bigger than a bed.",
     "recipes, spices, markets and cooking fast without burning anything"),
    ("a stand-up comedian between two tours",
     "You test jokes on everyone you meet and keep the ones that land.",
     "bad gigs, timing, hecklers and the funniest things people say by accident"),
    ("a jazz historian who ran a club in the sixties",
     "You saw the greats play in a room that held fifty people.",
     "records, improvisation, club stories and how to listen to a solo"),
    ("an astronomer at a desert observatory",
     "You sleep in the day and watch the sky from dusk until dawn.",
     "planets, comets, telescopes and how to find the constellations"),
    ("a bicycle mechanic who rebuilds old racing bikes",
     "Your workshop smells of chain oil and you can name a frame by its lugs.",
     "gears, punctures, famous races and the perfect Sunday ride"),
    ("the librarian of a small town library",
     "You have read most of the shelves and you love finding the right book.",
     "novels, local history, reading habits and forgotten authors"),
    ("a retired detective who now writes crime novels",
     "You solved real cases for twenty-five years and you still notice everything.",
     "old cases, clues, interviews and how a good mystery is built"),
    ("a gardener who runs a community allotment",
     "You grow vegetables on a plot that was a car park ten years ago.",
     "soil, seeds, pests, compost and what to plant each month"),
    ("a language tutor who teaches French to adults",
     "You make mistakes sound like progress and correct people gently.",
     "French phrases, travel, pronunciation and learning at any age"),
    ("a conservator who restores paintings for a museum",
     "You spend weeks on a square inch of canvas and you love every minute.",
     "pigments, varnish, forgeries and the painters whose work you have saved"),
    ("a former sommelier who now sells rare teas",
     "You traded wine for tea after a trip to the mountains of Yunnan.",
     "tea gardens, brewing times, tasting notes and the history of trade"),
    ("a chess coach at a youth club",
     "You teach children to think three moves ahead and to lose gracefully.",
     "openings, famous games, puzzles and how to stay calm at the board"),
    ("a trail running coach",
     "You have run across deserts and mountains and you still start every run slowly.",
     "training plans, shoes, injuries and the joy of muddy paths"),
    ("a narrator of ghost stories by the campfire",
     "You tell old tales slowly and let the listener decide whether to believe them.",
     "haunted houses, folklore, the sounds of the night and the stories behind them"),
]

NAMES = {
    "a": ["Ada Brennan", "Tomas Ruiz", "Ilse Vogel", "Marcus Flint", "Nadia Osei",
          "Edgar Holm", "Mei Lin", "Oscar Pratt", "Rosa Delgado", "Kenji Sato",
          "Lucie Marchand", "Hugo Stein", "Priya Nair", "Felix Obi", "Claire Dubois",
          "Anton Weber", "Sofia Conti", "Ivan Petrov", "Greta Lund", "Silas Crowe"],
    "b": ["Beatrix Hale", "Dario Mancini", "Elena Novak", "Farid Haddad", "Gwen Parry",
          "Hamish Reid", "Inès Laurent", "Jonas Berg", "Kira Tanaka", "Leo Fischer",
          "Mira Kovac", "Niall Byrne", "Olga Smirnova", "Paulo Costa", "Quentin Roux",
          "Rania Aziz", "Stellan Voss", "Talia Mendes", "Ulrich Baum", "Vera Quinn"],
}
ROTATION = {"a": 0, "b": 7}
"""Directory b gives each persona to another name and another file position."""
LANGUAGES: list[str | None] = ["en", "en", "fr", "en", "en/fr", None, "en", "fr/en"]

PROMPT_GENERATOR = '''

class PromptGenerator:
    def __init__(self, instructions: dict) -> None:
        self.instructions = instructions

    def make_system_prompt(self) -> str:
        from unmute.llm.system_prompt import (
            _DEFAULT_ADDITIONAL_INSTRUCTIONS,
            _SYSTEM_PROMPT_BASICS,
            _SYSTEM_PROMPT_TEMPLATE,
            LANGUAGE_CODE_TO_INSTRUCTIONS,
            get_readable_llm_name,
        )

        return _SYSTEM_PROMPT_TEMPLATE.format(
            _SYSTEM_PROMPT_BASICS=_SYSTEM_PROMPT_BASICS,
            additional_instructions=self.instructions.get("instruction_prompt")
            or _DEFAULT_ADDITIONAL_INSTRUCTIONS,
            language_instructions=LANGUAGE_CODE_TO_INSTRUCTIONS.get(
                self.instructions.get("language")
            ),
            llm_name=get_readable_llm_name(),
        )
'''


@dataclass(frozen=True)
class Tool:
    """What a character with tools adds to its file."""

    imports: str
    definitions: list[dict[str, Any]]
    helpers: str
    handler: str
    """``handle_tool_call``, indented as a method of PromptGenerator."""


def _function(name: str, description: str, properties: dict[str, Any],
              required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }}


TOOLS = {
    "street-food chef": Tool(
        imports="",
        definitions=[_function(
            "convert_units", "Convert a cooking quantity between units (g, oz, ml, cup, c, f).",
            {"value": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            ["value", "from", "to"],
        )],
        helpers='\n_FACTORS = {("g", "oz"): 0.035274, ("oz", "g"): 28.3495,\n'
                '            ("ml", "cup"): 0.00422675, ("cup", "ml"): 236.588}\n',
        handler='''
    def handle_tool_call(self, name: str, arguments: dict) -> str:
        if name != "convert_units":
            return f"Error: there is no tool named {name!r}."
        try:
            value = float(arguments["value"])
            source, target = arguments["from"].lower(), arguments["to"].lower()
        except (KeyError, TypeError, ValueError, AttributeError):
            return "Error: give value, from and to."
        if (source, target) == ("c", "f"):
            result = value * 9 / 5 + 32
        elif (source, target) == ("f", "c"):
            result = (value - 32) * 5 / 9
        elif (source, target) in _FACTORS:
            result = value * _FACTORS[source, target]
        else:
            return f"Error: cannot convert {source} to {target}."
        return f"{value:g} {source} is {result:.1f} {target}."
''',
    ),
    "ghost stories": Tool(
        imports="import random\n\n",
        definitions=[_function(
            "roll_dice", "Roll dice to decide a twist in the story; returns each roll.",
            {"sides": {"type": "integer", "description": "2 to 100"},
             "count": {"type": "integer", "description": "1 to 10"}},
            ["sides"],
        )],
        helpers="",
        handler='''
    def handle_tool_call(self, name: str, arguments: dict) -> str:
        if name != "roll_dice":
            return f"Error: there is no tool named {name!r}."
        sides, count = int(arguments.get("sides", 6)), int(arguments.get("count", 1))
        if not (2 <= sides <= 100 and 1 <= count <= 10):
            return "Error: sides must be 2 to 100 and count 1 to 10."
        rolls = [random.randint(1, sides) for _ in range(count)]
        return f"Rolled {count}d{sides}: {rolls}, total {sum(rolls)}."
''',
    ),
}
TOOL_PERSONAS = {6: TOOLS["street-food chef"], 19: TOOLS["ghost stories"]}


def instructions(name: str, persona: tuple[str, str, str]) -> str:
    role, background, topics = persona
    return (
        f"You are {name}, {role}. {background} You love talking about {topics}, and you "
        "ask the person about their own life as often as you talk about yours. Keep every "
        "answer to a few spoken sentences, check that the person is still listening before "
        "a long story, and never read out lists. When the person says goodbye, answer with "
        "a short farewell that ends with exactly Bye! as its last word, and never write "
        "Bye! at any other time."
    )


def slug(name: str) -> str:
    """``Inès Laurent`` → ``ines_laurent``: file and voice names."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return ascii_name.lower().replace(" ", "_")


def character_source(name: str, persona_index: int, position: int) -> str:
    """One character file in the Unmute fork's format."""
    persona = PERSONAS[persona_index]
    tool = TOOL_PERSONAS.get(persona_index)
    assignments: dict[str, Any] = {
        "CHARACTER_NAME": name,
        "VOICE_SOURCE": {"source_type": "file", "path_on_server": f"voices/{slug(name)}.wav",
                         "description": f"A recorded voice for {name}."},
        "INSTRUCTIONS": {"instruction_prompt": instructions(name, persona),
                         "language": LANGUAGES[position % len(LANGUAGES)]},
        "METADATA": {"good": position % 9 != 8,
                     "comment": None if position % 9 != 8 else "voice still being tuned"},
    }
    if tool is not None:
        assignments["TOOLS"] = tool.definitions
    body = "\n".join(
        f"{key} = {pprint.pformat(value, width=88, sort_dicts=False)}\n"
        for key, value in assignments.items()
    )
    return (f'"""Character: {name}, {persona[0]}."""\n\n'
            + (tool.imports if tool else "") + body
            + (tool.helpers if tool else "")
            + PROMPT_GENERATOR + (tool.handler if tool else ""))


def write_directories(root: Path) -> list[Path]:
    """Two directories of CHARACTER_COUNT different character files each."""
    directories = []
    for label, names in NAMES.items():
        directory = root / label
        directory.mkdir()
        for position, name in enumerate(names):
            persona_index = (position + ROTATION[label]) % len(PERSONAS)
            path = directory / f"{slug(name)}.py"
            path.write_text(character_source(name, persona_index, position))
        directories.append(directory)
    return directories


# ── statistics ───────────────────────────────────────────────────────────────


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Latency:
    """Milliseconds."""

    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = [s * 1000 for s in seconds]
        return cls(percentile(ms, 50), percentile(ms, 99), statistics.fmean(ms))


# ── processes and memory (/proc) ─────────────────────────────────────────────


def proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) of ``pid``, or None once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], fields[19]


def process_tree() -> dict[int, list[int]]:
    """Live (not zombie) processes by parent pid."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) is not None and stat[1] != "Z":
            children.setdefault(stat[0], []).append(int(name))
    return children


def descendants(root: int) -> list[int]:
    """Every process below ``root``, found through the ppid links."""
    children = process_tree()
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sandbox_children(server_pid: int) -> list[int]:
    """The running sandbox children: the processes the server's zygote forked."""
    children = process_tree()
    fork_servers = [
        pid for pid in children.get(server_pid, [])
        if b"sandbox.zygote" in _cmdline(pid)
    ]
    return [child for pid in fork_servers for child in children.get(pid, [])]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@functools.cache
def _warn_rss() -> None:
    log("cannot read smaps_rollup (the server is non-dumpable: run as root for PSS); "
        "using RSS, which counts shared pages in full")


def memory_kb(pid: int) -> int:
    """PSS of ``pid`` in KiB (0 once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        key = "Pss:"
    except PermissionError:
        _warn_rss()
        lines, key = Path(f"/proc/{pid}/status").read_text().splitlines(), "VmRSS:"
    except OSError:
        return 0
    return next(int(line.split()[1]) for line in lines if line.startswith(key))


@dataclass(frozen=True)
class Footprint:
    """KiB: the server process, and all processes below it (zygote, children)."""

    server_kb: int
    sandbox_kb: int

    @classmethod
    def of(cls, server_pid: int) -> Footprint:
        return cls(memory_kb(server_pid), sum(memory_kb(p) for p in descendants(server_pid)))


# ── the server subprocess ────────────────────────────────────────────────────


_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _terminate_with_parent() -> None:
    """In the server, before exec: SIGTERM it should this benchmark die unannounced."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Server:
    """``python -m server`` on a free loopback port, its output in a temp log file;
    ``options`` are added to its command line (e.g. ``--stt URL``)."""

    def __init__(self, allowed_root: Path, options: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(16)
        fd, name = tempfile.mkstemp(prefix="troupe-bench-server-", suffix=".log")
        self.log_path = Path(name)
        self._log = os.fdopen(fd, "wb")
        self._seen: set[tuple[int, str]] = set()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--allowed-root", str(allowed_root), "--max-reloads-per-minute", "100000",
             *options],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "TROUPE_ADMIN_TOKEN": self.admin_token},
            preexec_fn=_terminate_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def track(self) -> None:
        """Remember the processes now below the server, to check they end with it."""
        for pid in descendants(self.pid):
            if (stat := proc_stat(pid)) is not None:
                self._seen.add((pid, stat[2]))

    def stop(self) -> list[int]:
        """SIGTERM, wait; return (after killing them) the pids that outlived the server."""
        self.track()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                log("the server ignored SIGTERM; killing it")
                self.process.kill()
                self.process.wait()
        self._log.close()
        deadline = time.monotonic() + 5.0
        while (left := self._survivors()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def _survivors(self) -> list[int]:
        """Tracked processes still running (same pid and start time, not a zombie)."""
        alive = []
        for pid, started in self._seen:
            stat = proc_stat(pid)
            if stat is not None and stat[2] == started and stat[1] != "Z":
                alive.append(pid)
        return alive


# ── the WebSocket client ─────────────────────────────────────────────────────


class Realtime:
    """One session, OpenAI GA dialect (``?model=bench``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def receive(self, expected: str) -> dict[str, Any]:
        message = await self.ws.receive(timeout=TIMEOUT)
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise BenchError(f"expected {expected}, got a {message.type.name} frame")
        event: dict[str, Any] = msgspec.json.decode(message.data)
        if event.get("type") != expected:
            raise BenchError(f"expected {expected}, got {event}")
        return event

    async def request(self, expected: str, event_type: str, **fields: Any) -> dict[str, Any]:
        await self.ws.send_str(msgspec.json.encode({"type": event_type, **fields}).decode())
        return await self.receive(expected)

    async def close(self) -> None:
        await self.ws.close()


class Client:
    """HTTP and WebSocket access to one running server."""

    def __init__(self, http: aiohttp.ClientSession, server: Server) -> None:
        self.http = http
        self.server = server

    async def health(self) -> dict[str, Any]:
        async with self.http.get(f"{self.server.url}/v1/health") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                raise BenchError(f"the server exited:\n{self.server.log_tail()}")
            try:
                if (await self.health())["ok"]:
                    return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        raise BenchError(f"the server was not healthy within {TIMEOUT:g} s:\n"
                         f"{self.server.log_tail()}")

    async def wait_settled(self, sessions: int) -> dict[str, Any]:
        """Until ``sessions`` are open, the pool is full, no retired child runs (counted
        in /proc) and the server's own count of children has stopped moving (closing
        sessions still finishing their kills); returns the last health body."""
        deadline = time.monotonic() + TIMEOUT
        previous: tuple[int, ...] = ()
        while True:
            body = await self.health()
            pool = body["sandbox"]
            wanted = (pool["pool_size"] + pool["default_set_loaded"] + pool.get("warm", 0)
                      + sessions)
            running = len(sandbox_children(self.server.pid))
            state = (body["sessions"]["active"], running, pool["pool_idle"], pool["children"])
            if state == previous and state[:3] == (sessions, wanted, pool["pool_size"]):
                return body
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not settle with {sessions} sessions "
                                 f"({running} sandbox children running): {body}")
            previous = state
            await asyncio.sleep(SETTLE_POLL)

    async def open(self) -> Realtime:
        ws = await self.http.ws_connect(
            f"{self.server.url}/v1/realtime?model=bench", protocols=("realtime",)
        )
        session = Realtime(ws)
        try:
            await session.receive("session.created")
        except BaseException:
            await session.close()
            raise
        return session

    async def start_session(self) -> tuple[Realtime, float, float]:
        """A new session whose characters are listed, and the seconds until
        ``session.created`` and until ``session.characters.listed``."""
        started = time.perf_counter()
        session = await self.open()
        created = time.perf_counter() - started
        try:
            listed = await session.request("session.characters.listed",
                                           "session.characters.list")
        except BaseException:
            await session.close()
            raise
        elapsed = time.perf_counter() - started
        if listed["character_count"] < 1:
            raise BenchError(f"the default set listed no characters: {listed}")
        return session, created, elapsed

    async def sandbox_pids(self) -> list[int]:
        async with self.http.get(
            f"{self.server.url}/v1/sessions",
            headers={"Authorization": f"Bearer {self.server.admin_token}"},
        ) as response:
            sessions = await response.json()
        return [s["sandbox_pid"] for s in sessions if s["sandbox_pid"] is not None]


# ── measurements ─────────────────────────────────────────────────────────────


async def measure_reloads(
    client: Client, directories: list[Path], count: int
) -> tuple[list[float], list[float]]:
    """Client-observed and server-reported (``duration_ms``) seconds per reload."""
    session = await client.open()
    observed, reported = [], []
    try:
        for index in range(RELOAD_WARMUP + count):
            directory = directories[index % len(directories)]
            started = time.perf_counter()
            reply = await session.request("session.characters.reloaded",
                                          "session.characters.reload", directory=str(directory))
            elapsed = time.perf_counter() - started
            if reply["loaded_count"] != CHARACTER_COUNT or reply["error_count"] != 0:
                raise BenchError(f"reload of {directory}: {reply['loaded_count']} loaded, "
                                 f"errors {reply['errors']}")
            if index >= RELOAD_WARMUP:
                observed.append(elapsed)
                reported.append(reply["duration_ms"] / 1000)
    finally:
        await session.close()
    return observed, reported


def load_inprocess(directory: Path) -> int:
    """Load the character files of ``directory`` the Unmute fork's way; how many loaded."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(directory)]
    sys.modules[PACKAGE] = package
    names = set()
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for attribute in ("CHARACTER_NAME", "VOICE_SOURCE", "INSTRUCTIONS", "PromptGenerator"):
            if not hasattr(module, attribute):
                raise BenchError(f"{path} has no {attribute}")
        if not callable(getattr(module.PromptGenerator, "make_system_prompt", None)):
            raise BenchError(f"{path}: PromptGenerator has no make_system_prompt")
        module.PromptGenerator(module.INSTRUCTIONS)
        names.add(module.CHARACTER_NAME)
    return len(names)


def forget_package() -> None:
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def measure_inprocess(directories: list[Path], count: int, bytecode: bool) -> list[float]:
    """Seconds per in-process load of a whole directory; with ``bytecode`` Python's
    default (``__pycache__`` written by the warm-up, then read), else compiled anew."""
    sys.path.insert(0, str(SHIMS))
    wrote_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, not bytecode
    samples = []
    try:
        for index in range(RELOAD_WARMUP + count):
            directory = directories[index % len(directories)]
            started = time.perf_counter()
            loaded = load_inprocess(directory)
            elapsed = time.perf_counter() - started
            forget_package()
            if loaded != CHARACTER_COUNT:
                raise BenchError(f"{directory}: {loaded} characters loaded in-process")
            if index >= RELOAD_WARMUP:
                samples.append(elapsed)
    finally:
        forget_package()
        sys.dont_write_bytecode = wrote_bytecode
        sys.path.remove(str(SHIMS))
    return samples


async def measure_session_starts(client: Client, count: int) -> tuple[list[float], list[float]]:
    """Seconds per session start: until ``session.created``, and until listed."""
    created, listed = [], []
    for index in range(START_WARMUP + count):
        session, to_created, to_listed = await client.start_session()
        await session.close()
        if index >= START_WARMUP:
            created.append(to_created)
            listed.append(to_listed)
    return created, listed


@dataclass(frozen=True)
class IdleMemory:
    """MiB per idle session, and the median PSS of a session's sandbox child."""

    sessions: int
    server_mb: float
    sandbox_mb: float
    child_median_mb: float

    @property
    def total_mb(self) -> float:
        return self.server_mb + self.sandbox_mb


async def measure_idle_memory(client: Client, count: int) -> IdleMemory:
    await client.wait_settled(sessions=0)
    before = Footprint.of(client.server.pid)
    sessions: list[Realtime] = []
    try:
        for _ in range(count):
            sessions.append((await client.start_session())[0])
        await client.wait_settled(sessions=count)
        after = Footprint.of(client.server.pid)
        children = [memory_kb(pid) for pid in await client.sandbox_pids()]
        client.server.track()
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    if len(children) != count:
        raise BenchError(f"the admin API lists {len(children)} sandboxes for {count} sessions")
    per_session = count * 1024
    return IdleMemory(
        sessions=count,
        server_mb=(after.server_kb - before.server_kb) / per_session,
        sandbox_mb=(after.sandbox_kb - before.sandbox_kb) / per_session,
        child_median_mb=statistics.median(children) / 1024,
    )


@dataclass(frozen=True)
class Results:
    reload: Latency
    reload_server: Latency
    inprocess: Latency
    inprocess_compiling: Latency
    session_created: Latency
    session_start: Latency
    memory: IdleMemory

    @property
    def ratio(self) -> float:
        return self.reload.p50 / self.inprocess.p50

    def figures(self) -> dict[str, float]:
        """The JSON line."""
        return {key: round(value, 2) for key, value in {
            "reload_p50_ms": self.reload.p50,
            "reload_p99_ms": self.reload.p99,
            "inprocess_p50_ms": self.inprocess.p50,
            "ratio_p50": self.ratio,
            "session_start_p50_ms": self.session_start.p50,
            "idle_session_mb": self.memory.total_mb,
        }.items()}


async def measure_server(
    server: Server, directories: list[Path], args: argparse.Namespace
) -> tuple[Latency, Latency, Latency, Latency, IdleMemory]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        client = Client(http, server)
        await client.wait_ready()
        server.track()
        log(f"reload: {RELOAD_WARMUP} warm-up + {args.reloads} reloads of {CHARACTER_COUNT} files")
        observed, reported = await measure_reloads(client, directories, args.reloads)
        await client.wait_settled(sessions=0)
        log(f"session start: {START_WARMUP} warm-up + {args.session_starts} sessions")
        created, starts = await measure_session_starts(client, args.session_starts)
        log(f"memory: {args.idle_sessions} idle sessions")
        memory = await measure_idle_memory(client, args.idle_sessions)
        body = await client.wait_settled(sessions=0)
        counted, running = body["sandbox"]["children"], len(sandbox_children(server.pid))
        if counted != running:
            log(f"warning: /v1/health counts {counted} live sandbox children while "
                f"{running} run: the server lost track of {counted - running} killed ones")
    return (Latency.of(observed), Latency.of(reported), Latency.of(created),
            Latency.of(starts), memory)


def run(args: argparse.Namespace) -> Results:
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as tmp:
        root = Path(tmp).resolve()
        directories = write_directories(root)
        log(f"in-process baseline: {RELOAD_WARMUP} warm-up + {args.reloads} loads")
        inprocess_compiling = Latency.of(measure_inprocess(directories, args.reloads, False))
        inprocess = Latency.of(measure_inprocess(directories, args.reloads, True))
        server = Server(root)
        log(f"server pid {server.pid} on {server.url}, log {server.log_path}")
        completed = False
        try:
            reload, reload_server, created, starts, memory = asyncio.run(
                measure_server(server, directories, args)
            )
            completed = True
        finally:
            leftovers = server.stop()
            if leftovers:
                log(f"processes outlived the server and were killed: {sorted(leftovers)}")
            if completed and not leftovers:
                server.log_path.unlink()
            else:
                log(f"server log kept at {server.log_path}")
    if leftovers:
        raise BenchError(f"{len(leftovers)} processes outlived the server")
    return Results(reload, reload_server, inprocess, inprocess_compiling, created, starts, memory)


# ── report ───────────────────────────────────────────────────────────────────


def table(results: Results) -> list[tuple[str, str, str, str]]:
    """(figure, value, budget, verdict) rows."""
    figures = results.figures()

    def budgeted(label: str, key: str, unit: str) -> tuple[str, str, str, str]:
        value, budget = figures[key], BUDGETS[key]
        return (label, f"{value:.2f} {unit}", f"≤ {budget:g} {unit}",
                "PASS" if value <= budget else "FAIL")

    def info(label: str, value: float, unit: str) -> tuple[str, str, str, str]:
        return (label, f"{value:.2f} {unit}", "", "")

    memory = results.memory
    return [
        budgeted("reload p50 (client-observed)", "reload_p50_ms", "ms"),
        budgeted("reload p99 (client-observed)", "reload_p99_ms", "ms"),
        info("reload mean (client-observed)", results.reload.mean, "ms"),
        info("reload p50, server's duration_ms", results.reload_server.p50, "ms"),
        info("in-process load p50 (bytecode cached)", results.inprocess.p50, "ms"),
        info("in-process load p99 (bytecode cached)", results.inprocess.p99, "ms"),
        info("in-process load p50 (compiling)", results.inprocess_compiling.p50, "ms"),
        budgeted("ratio reload p50 / in-process p50", "ratio_p50", "x"),
        budgeted("session start p50 (created + listed)", "session_start_p50_ms", "ms"),
        info("session start p99", results.session_start.p99, "ms"),
        info("  session.created alone, p50", results.session_created.p50, "ms"),
        budgeted(f"idle session, PSS ({memory.sessions} open)", "idle_session_mb", "MB"),
        info("  of which server process", memory.server_mb, "MB"),
        info("  of which zygote + sandbox children", memory.sandbox_mb, "MB"),
        info("sandbox child PSS, median", memory.child_median_mb, "MB"),
    ]


Row = tuple[str, str, str, str]


def report(rows: Sequence[Row], figures: dict[str, float]) -> None:
    rows = [("figure", "value", "budget", "result"), *rows]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print(json.dumps(figures), flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("characters", "voice"), default=None,
                        help="run one part: the reload, session start and memory figures "
                        "(characters) or the voice loop (voice; see scripts/bench_voice.py); "
                        "default: both")
    parser.add_argument("--reloads", type=int, default=200, metavar="N",
                        help="measured reloads, and in-process loads (default: 200)")
    parser.add_argument("--session-starts", type=int, default=100, metavar="N",
                        help="measured session starts (default: 100)")
    parser.add_argument("--idle-sessions", type=int, default=50, metavar="N",
                        help="sessions held open for the memory figure (default: 50)")
    # Imported here, not at the top: bench_voice imports this module.
    from scripts import bench_voice

    bench_voice.add_arguments(parser)
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the clean-up below


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rows: list[Row] = []
    figures: dict[str, float] = {}
    try:
        if args.only in (None, "characters"):
            results = run(args)
            rows += table(results)
            figures |= results.figures()
        if args.only in (None, "voice"):
            from scripts import bench_voice

            voice = bench_voice.run(args)
            rows += voice.rows()
            figures |= voice.figures()
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    report(rows, figures)
    return 0


if __name__ == "__main__":
    # Run the importable copy, scripts.bench, so that scripts.bench_voice (which
    # imports it) shares its classes, BenchError among them.
    from scripts import bench

    sys.exit(bench.main())
