"""A local Troupe cluster: N replicas behind HAProxy, with Redis (``make cluster``).

    python -m scripts.cluster [--replicas N] [--port 8080] [--server-arg=ARG]...

    redis-server 127.0.0.1:R  (no persistence)   the sessions' state, --state-url
    python -m server --port P1 [--state-url redis://127.0.0.1:R/0]      ┐
                     [--trusted-proxy 127.0.0.1] …                      │
    python -m server --port P2 …                                        ├ the replicas
    …                                                                   ┘
    haproxy -db -f <deploy/haproxy.cfg filled in>   127.0.0.1:8080 ─▶ leastconn over the
                                                    replicas whose /v1/ready is 200

Replicas are passed ``--state-url`` only when ``python -m server --help`` lists it,
and ``--trusted-proxy 127.0.0.1`` (HAProxy's address) likewise: the per-address
handshake limit then counts the client HAProxy names in X-Forwarded-For, not HAProxy.
They share a client-secret signing key (TROUPE_CLIENT_SECRET_KEY, random per cluster
unless set), so a client secret minted by one is accepted by the others.

Every process is started by this one, in its own process group, and stopped by its
pid: Ctrl-C (SIGINT) or SIGTERM is forwarded to the replicas (SIGTERM: they drain for
their --drain-timeout; SIGINT: they close their sessions with 1001 at once; a second
Ctrl-C also makes a draining replica stop at once), then HAProxy and Redis are
stopped. Should this process die, each child gets SIGTERM from the kernel
(PR_SET_PDEATHSIG). Output of each process goes to ``--log-dir`` (default
``bench-results/cluster/``), with the HAProxy configuration used.

``--loadtest-backends`` also starts the load test's protocol-faithful fake STT, TTS
and LLM (``scripts/loadtest/fakes.py``, scripted for ``scripts.loadtest --scenario
capacity`` with its default speech, seed and audio lead) and points every replica at
them, so that ``python -m scripts.loadtest --url <the front> --scenario capacity``
measures the cluster's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp

from scripts.measure import descendants, die_with_parent, free_port

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "haproxy.cfg"
INSTALL_HINT = "install them with: apt-get install haproxy redis-server"
START_TIMEOUT = 60.0
STOP_MARGIN = 15.0
"""Seconds a replica may take to exit beyond its drain before it is killed."""
_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")


class ClusterProblem(Exception):
    """Something the cluster needs is missing or did not start; the message says what."""


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin and /sbin (not on a user's PATH on Debian)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def render(template: str, *, bind: str, servers: Sequence[tuple[str, int]],
           check_interval: str = "1s", host: str = "127.0.0.1") -> str:
    """``deploy/haproxy.cfg`` with its ``{{ name }}`` placeholders filled in: one
    ``server`` line per (name, port). Raises ``KeyError`` for a placeholder it does
    not know."""
    values = {"bind": bind, "check_interval": check_interval,
              "servers": "\n".join(f"    server {name} {host}:{port}"
                                   for name, port in servers)}
    return _PLACEHOLDER.sub(lambda found: values[found[1]], template)


@functools.cache
def server_options() -> str:
    """``python -m server --help``: what this checkout's server accepts (asked once)."""
    done = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout


def check_config(haproxy: str, path: Path) -> str | None:
    """``haproxy -c``: None when it accepts ``path``, else what it said."""
    done = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    return None if done.returncode == 0 else done.stdout + done.stderr


def _own_group_dying_with_us() -> None:
    """In a child, before exec: its own process group (Ctrl-C reaches this process
    only, which forwards it), and SIGTERM should this process die."""
    os.setpgid(0, 0)
    die_with_parent()


@dataclass
class Replica:
    name: str
    port: int
    process: asyncio.subprocess.Process
    log: Path
    drain: float
    """Its --drain-timeout: the longest it may take to stop on SIGTERM."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Cluster:
    """Replicas (each with its own extra ``python -m server`` options), Redis and
    HAProxy on 127.0.0.1. ``async with`` starts and stops them; ``stop`` forwards a
    signal. Raises ``ClusterProblem`` when HAProxy is missing or something does not
    come up."""

    replica_args: Sequence[Sequence[str]]
    log_dir: Path
    port: int = 0
    """The front port; 0: a free one."""
    check_interval: str = "1s"
    env: dict[str, str] = field(default_factory=dict)
    """Added to every replica's environment."""
    redis: bool = True
    """Start Redis (when installed) and pass --state-url if the server accepts it."""
    loadtest_backends: bool = False
    replicas: list[Replica] = field(default_factory=list)
    redis_url: str | None = None
    config_path: Path | None = None
    _others: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def haproxy_pid(self) -> int | None:
        process = self._others.get("haproxy")
        return process.pid if process else None

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.stop(signal.SIGINT)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(signal.SIGINT)

    async def start(self) -> None:
        haproxy = find_binary("haproxy")
        if haproxy is None:
            raise ClusterProblem(f"haproxy is not installed; {INSTALL_HINT}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = {**os.environ, **self.env}
        env.setdefault("TROUPE_CLIENT_SECRET_KEY", secrets.token_urlsafe(32))
        common: list[str] = []
        if self.redis:
            common += await self._start_redis()
        if self.loadtest_backends:
            common += await self._start_fakes()
        if "--trusted-proxy" in await asyncio.to_thread(server_options):
            common += ["--trusted-proxy", "127.0.0.1"]
        starting = []
        for number, extra in enumerate(self.replica_args, start=1):
            name, port = f"r{number}", free_port()
            log = self.log_dir / f"{name}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "server", "--host", "127.0.0.1", "--port",
                    str(port), *common, *extra, cwd=REPO, env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=_own_group_dying_with_us)
            drain = _drain_timeout([*common, *extra], env)
            self.replicas.append(Replica(name, port, process, log, drain))
            starting.append(self._until_up(self.replicas[-1]))
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*starting)
            self.config_path = self.log_dir / "haproxy.cfg"
            self.config_path.write_text(render(
                TEMPLATE.read_text(), bind=f"127.0.0.1:{self.port}",
                servers=[(r.name, r.port) for r in self.replicas],
                check_interval=self.check_interval))
            problem = await asyncio.to_thread(check_config, haproxy, self.config_path)
            if problem:
                raise ClusterProblem(f"haproxy -c refused {self.config_path}:\n{problem}")
            await self._spawn("haproxy", [haproxy, "-db", "-f", str(self.config_path)])
            await self._until_answers(http, f"{self.url}/v1/health", "haproxy")

    async def _spawn(self, name: str, argv: list[str],
                     stdout: int | TextIO | None = None) -> asyncio.subprocess.Process:
        with (self.log_dir / f"{name}.log").open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stdin=asyncio.subprocess.PIPE,
                stdout=stdout if stdout is not None else out, stderr=out,
                preexec_fn=_own_group_dying_with_us)
        self._others[name] = process
        return process

    async def _start_redis(self) -> list[str]:
        """Redis on a free loopback port, without persistence; returns the replicas'
        --state-url option, or nothing when the server has none (or no Redis here)."""
        if "--state-url" not in await asyncio.to_thread(server_options):
            return []
        binary = find_binary("redis-server")
        if binary is None:
            print(f"cluster: redis-server is not installed: no --state-url ({INSTALL_HINT})",
                  file=sys.stderr)
            return []
        port = free_port()
        await self._spawn("redis", [binary, "--bind", "127.0.0.1", "--port", str(port),
                                    "--save", "", "--appendonly", "no",
                                    "--daemonize", "no", "--loglevel", "warning",
                                    "--dir", str(self.log_dir)])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"PING\r\n")
                answer = await reader.readline()
                writer.close()
                if answer.startswith(b"+PONG"):
                    self.redis_url = f"redis://127.0.0.1:{port}/0"
                    return ["--state-url", self.redis_url]
            await asyncio.sleep(0.05)
        raise ClusterProblem(f"redis-server did not answer on 127.0.0.1:{port} "
                             f"(log {self.log_dir / 'redis.log'})")

    async def _start_fakes(self) -> list[str]:
        """The load test's fake backends, scripted for its capacity scenario."""
        # Only here: the load test loads the speech synthesiser's modules.
        from scripts.loadtest.cli import parse_args
        from scripts.loadtest.run import prepare

        args = parse_args(["--scenario", "capacity"])
        prepared = await asyncio.to_thread(prepare, args, random.Random(args.seed))
        shutil.rmtree(prepared.workdir, ignore_errors=True)
        script = json.dumps(prepared.cycle.stt_script())
        fakes = await self._spawn("fakes", [sys.executable, "-m", "scripts.loadtest.fakes",
                                            script], stdout=asyncio.subprocess.PIPE)
        assert fakes.stdout is not None
        try:
            urls = json.loads(await asyncio.wait_for(fakes.stdout.readline(), START_TIMEOUT))
        except (TimeoutError, ValueError):
            raise ClusterProblem("the load test's fake backends did not start (log "
                                 f"{self.log_dir / 'fakes.log'})") from None
        return ["--stt", urls["stt"], "--tts", urls["tts"], "--llm", urls["llm"],
                "--llm-model", urls["model"], "--max-reloads-per-minute", "1000000"]

    async def _until_up(self, replica: Replica) -> None:
        async with aiohttp.ClientSession() as http:
            await self._until_answers(http, f"{replica.url}/v1/health", replica.name,
                                      replica.process)

    async def _until_answers(self, http: aiohttp.ClientSession, url: str, name: str,
                             process: asyncio.subprocess.Process | None = None) -> None:
        process = process or self._others.get(name)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process is not None and process.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as answer:
                    if answer.status < 500:
                        return
            await asyncio.sleep(0.05)
        log = self.log_dir / f"{name}.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() \
            else ""
        raise ClusterProblem(f"{name} did not come up ({url}; log {log}):\n{tail}")

    async def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        """Forward ``how`` to every replica and wait for them (a drain, with SIGTERM),
        then stop HAProxy, the fakes and Redis; anything that outlives its time is
        killed, by pid, with what it left below it."""
        await asyncio.gather(*(stop_process(r.process, how, STOP_MARGIN + r.drain)
                               for r in self.replicas))
        for name in ("haproxy", "fakes", "redis"):
            process = self._others.get(name)
            if process is not None:
                if process.stdin is not None:
                    process.stdin.close()
                await stop_process(process, signal.SIGTERM, STOP_MARGIN)


def _drain_timeout(argv: Sequence[str], env: dict[str, str]) -> float:
    """The --drain-timeout ``python -m server`` gets from ``argv`` and ``env``."""
    value = env.get("TROUPE_DRAIN_TIMEOUT", "30")
    for at, word in enumerate(argv):
        if word == "--drain-timeout" and at + 1 < len(argv):
            value = argv[at + 1]
        elif word.startswith("--drain-timeout="):
            value = word.partition("=")[2]
    return float(value)


async def stop_process(process: asyncio.subprocess.Process, how: signal.Signals,
                       limit: float) -> int:
    """Send ``how`` to ``process`` and wait up to ``limit`` s; then SIGKILL it and
    every process still below it. Returns its exit status."""
    if process.returncode is None:
        below = list(descendants(process.pid))
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(how)
        try:
            await asyncio.wait_for(process.wait(), limit)
        except TimeoutError:
            for pid in [process.pid, *below]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await process.wait()
    return process.returncode if process.returncode is not None else -1


# ── the command line ─────────────────────────────────────────────────────────


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.cluster",
        description="Run N Troupe replicas behind HAProxy (balance leastconn, health "
        "checks on /v1/ready) with Redis, on 127.0.0.1, until Ctrl-C.",
        epilog=f"Needs HAProxy and Redis ({INSTALL_HINT}). Measure the cluster with "
        "python -m scripts.loadtest --url ws://127.0.0.1:PORT/v1/realtime?model=loadtest "
        "--scenario capacity (start it with --loadtest-backends).")
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="replicas to start (default: one per core, %(default)s)")
    parser.add_argument("--port", type=int, default=8080,
                        help="HAProxy's port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--check-interval", default="1s", metavar="TIME",
                        help="HAProxy's health-check interval (default: %(default)s)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more option for every replica's python -m server, "
                        "e.g. --server-arg=--max-sessions=60 (repeatable)")
    parser.add_argument("--no-redis", dest="redis", action="store_false",
                        help="no Redis, no --state-url (resume stays on one replica)")
    parser.add_argument("--loadtest-backends", action="store_true",
                        help="point the replicas at the load test's fake STT, TTS and LLM "
                        "(scripted for scripts.loadtest --scenario capacity)")
    parser.add_argument("--log-dir", type=Path, default=REPO / "bench-results" / "cluster",
                        help="where each process's output and the HAProxy configuration "
                        "go (default: bench-results/cluster)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the HAProxy configuration for --replicas on ports "
                        "8001… and exit")
    return parser


async def serve(args: argparse.Namespace) -> int:
    """Start the cluster, wait for Ctrl-C or SIGTERM, forward it; 1 when the cluster
    could not start. Whatever happens, everything started is stopped."""
    cluster = Cluster([args.server_arg] * args.replicas, args.log_dir, port=args.port,
                      check_interval=args.check_interval, redis=args.redis,
                      loadtest_backends=args.loadtest_backends)
    signalled = asyncio.Queue[signal.Signals]()
    for how in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(how, signalled.put_nowait, how)
    started = asyncio.ensure_future(cluster.start())
    early = asyncio.ensure_future(signalled.get())
    try:
        await asyncio.wait({started, early}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClusterProblem):
                await started
            return 130
        early.cancel()
        started.result()
        announce(cluster, args.loadtest_backends)
        how = await signalled.get()
        print(f"cluster: {how.name}: stopping the replicas"
              + (" (they drain; Ctrl-C to stop at once)" if how == signal.SIGTERM else ""),
              file=sys.stderr, flush=True)
        stopping = asyncio.ensure_future(cluster.stop(how))
        again = asyncio.ensure_future(signalled.get())
        await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
        if again.done():  # a second signal: the replicas stop at once (SIGINT)
            for replica in cluster.replicas:
                with contextlib.suppress(ProcessLookupError):
                    replica.process.send_signal(signal.SIGINT)
        again.cancel()
        await stopping
        return 0
    except ClusterProblem as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        await cluster.stop(signal.SIGINT)  # whatever is still running


def announce(cluster: Cluster, loadtest_backends: bool) -> None:
    for replica in cluster.replicas:
        print(f"  {replica.name}  {replica.url}  pid {replica.pid}  log {replica.log}")
    print(f"  state   {cluster.redis_url or 'none (resume stays on one replica)'}")
    print(f"  HAProxy pid {cluster.haproxy_pid}, configuration {cluster.config_path}")
    print(f"Troupe cluster of {len(cluster.replicas)} on {cluster.url} "
          f"({cluster.ws_url}?model=...). Ctrl-C stops it.")
    print(f"Measure it: .venv/bin/python -m scripts.loadtest --url "
          f"'{cluster.ws_url}?model=loadtest' --scenario capacity"
          + ("" if loadtest_backends else " (start the cluster with --loadtest-backends "
             "for that)"), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas < 1:
        print("cluster: --replicas must be at least 1", file=sys.stderr)
        return 2
    if args.print_config:
        print(render(TEMPLATE.read_text(), bind=f"127.0.0.1:{args.port}",
                     servers=[(f"r{i}", 8000 + i) for i in range(1, args.replicas + 1)],
                     check_interval=args.check_interval), end="")
        return 0
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
