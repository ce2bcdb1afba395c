"""How sandbox children are started and talked to: start methods and IPC, measured.

Run as ``.venv/bin/python -m scripts.startmethods`` from the repository root. It binds
no network port (the fork servers listen on their usual AF_UNIX socket), stays well
under a minute on the 2-core dev machine, stops every process it starts by PID, and
prints a table with notes and, as its very last line, one JSON object with every
figure. Progress goes to stderr.

What is measured (p50 / p99 over RUNS runs after WARMUP warm-ups unless said):

1. Child ready time, from asking for a process to holding its first message, and PSS
   per child (``/proc/<pid>/smaps_rollup``) with ALIVE children alive, for
     a. the project's path: ``sandbox.process._start_process`` through the fork server
        with ``sandbox.child`` + ``sandbox.forkserver_init`` preloaded and
        ``gc.freeze()``, the lean Popen, a contained child, its ready ``Pong`` read
        with ``wire.read_frame``;
     b. the stock ``forkserver`` context (its default preload, which under ``-m``
        loads nothing), a trivial target of this module sending one message on a Pipe;
     c. ``spawn`` with the same target;
     d. ``fork`` from this single-threaded process with the same target.
   Even with ``-m``, stock forkserver and spawn children re-run this module's top
   level (by name, as ``__mp_main__``; only its ``__main__`` block is skipped), so it
   imports little at top level, and each child's re-run is timed and shown apart. A
   heavy main module (pytest, the server) is what makes the ~200 ms / ~29 MiB of
   DESIGN.md section 4.
2. The blocking time of starting (Pipe + Process + ``start()``; for a, the whole
   ``_start_process``), which is what would stall an event loop.
3. Round trip of a Ping/Pong-sized request, IPC_N times after IPC_WARMUP (i-iii
   measured in turns of IPC_BLOCK, so that machine noise hits them alike): (i) our
   framing, raw socketpair fd, ``wire.encode`` + ``wire.read_frame`` both sides, with a
   real contained sandbox child and with a forked echo child; (ii)
   ``Connection.send_bytes``/``recv_bytes`` of msgspec payloads; (iii)
   ``Connection.send``/``recv`` (pickle) of a dict; (iv) ``Sandbox.ping()`` through
   ``sandbox.pool.Pool`` on asyncio.
4. SIGKILL + reap of one child (until ``join()`` returns), and of ALIVE at once.
"""

from __future__ import annotations

import time

_EXEC_STARTED = time.perf_counter()
"""When this module's top level began to run (CLOCK_MONOTONIC, comparable across
processes): a stock forkserver or spawn child re-runs it before it calls its target."""

import multiprocessing  # noqa: E402  (kept few and stdlib-only: children re-run them)
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing costs ~4 ms a child
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

WARMUP = 5
RUNS = 50
ALIVE = 20
IPC_WARMUP = 200
IPC_N = 2000
WAIT = 15.0
"""Seconds any single wait may take before the run counts as broken."""
DEADLINE = 55
"""Seconds the whole run may take (SIGALRM), cleanup included after it."""

MIB = 1024 * 1024

# ── child targets: top level so that they pickle; this module imports only stdlib ──


def trivial_ready(conn: Any) -> None:
    """Send one message, then wait for the parent to go away (or for SIGKILL).

    The message carries when this module's top level started and ended running in
    this process and when the target was entered, so the parent can tell how much of
    the ready time was the re-run of the main module."""
    conn.send_bytes(f"ready {_EXEC_STARTED!r} {_EXEC_DONE!r} {time.perf_counter()!r}".encode())
    try:
        conn.recv_bytes()
    except (EOFError, OSError):
        pass


def echo_framed(conn: Any) -> None:
    """Our framing on a raw fd: ``read_frame`` → ``decode_request`` → ``write_frame``."""
    from sandbox import wire

    fd, pid = conn.fileno(), os.getpid()
    while (frame := wire.read_frame(fd)) is not None:
        request = wire.decode_request(frame)
        wire.write_frame(fd, wire.Pong(id=request.id, pid=pid))


def echo_msgspec(conn: Any) -> None:
    """``Connection.recv_bytes``/``send_bytes`` with msgspec payloads."""
    import msgspec

    from sandbox import wire

    encoder, pid = msgspec.msgpack.Encoder(), os.getpid()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        request = wire.decode_request(data)
        conn.send_bytes(encoder.encode(wire.Pong(id=request.id, pid=pid)))


def echo_pickle(conn: Any) -> None:
    """``Connection.recv``/``send``: pickled dicts."""
    pid = os.getpid()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        conn.send({"kind": "Pong", "id": request["id"], "pid": pid})


# ── helpers ──────────────────────────────────────────────────────────────────


class Broken(Exception):
    """The run cannot produce trustworthy figures."""


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"startmethods: {time.perf_counter() - _T0:5.1f} s  {message}", file=sys.stderr,
          flush=True)


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), "n": len(samples)}


def wait_readable(fd: int) -> None:
    if not select.select([fd], [], [], WAIT)[0]:
        raise Broken(f"nothing to read on fd {fd} within {WAIT:g} s")


def smaps(pid: int) -> tuple[float, float]:
    """(PSS, USS) of ``pid`` in MiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields["Pss"] / 1024, uss / 1024


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Tracker:
    """Every PID this run started, so that the end can prove none is left."""

    def __init__(self) -> None:
        self.pids: dict[int, str] = {}

    def add(self, pid: int | None, what: str) -> None:
        if pid is not None:
            self.pids[pid] = what

    def leftovers(self) -> dict[int, str]:
        return {pid: what for pid, what in self.pids.items() if alive(pid)}

    def kill_leftovers(self) -> dict[int, str]:
        left = self.leftovers()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # not ours: the fork server or pid 1 reaps it
        return left


def our_children() -> list[int]:
    """PIDs (zombies included) whose parent is this process."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            found.append(int(name))
    return found


def helper_pids() -> tuple[int | None, int | None]:
    """PIDs of multiprocessing's fork server and resource tracker, if running."""
    from multiprocessing import forkserver, resource_tracker

    return (
        forkserver._forkserver._forkserver_pid,  # type: ignore[attr-defined]
        resource_tracker._resource_tracker._pid,  # type: ignore[attr-defined]
    )


def stop_stock_helpers() -> None:
    """Stop (and reap) the stock fork server and resource tracker, if running."""
    from multiprocessing import forkserver, resource_tracker

    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


# ── 1, 2, 4 for the project's path ───────────────────────────────────────────


def project_path(tracker: Tracker, results: dict[str, Any]) -> None:
    import msgspec

    from sandbox import process as sandbox_process
    from sandbox import wire
    from sandbox.config import ChildLimits

    limits = ChildLimits()
    encoded = msgspec.msgpack.encode(limits)
    sandbox_process.start_forkserver(limits.safe_env)
    server_pid, tracker_pid = helper_pids()
    tracker.add(server_pid, "project fork server")
    tracker.add(tracker_pid, "resource tracker (project fork server)")
    started: list[tuple[Any, Any]] = []

    def start() -> tuple[Any, Any, float, float]:
        t0 = time.perf_counter()
        process, conn = sandbox_process._start_process(encoded)
        t1 = time.perf_counter()
        started.append((process, conn))
        tracker.add(process.pid, "project child")
        fd = conn.fileno()
        wait_readable(fd)
        frame = wire.read_frame(fd)
        t2 = time.perf_counter()
        if frame is None or not isinstance(wire.decode_reply(frame), wire.Pong):
            raise Broken("a project child did not send its ready Pong")
        return process, conn, t1 - t0, t2 - t0

    def kill(process: Any) -> None:
        for send in (os.killpg, os.kill):
            try:
                send(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def finish(process: Any, conn: Any) -> None:
        process.close()
        conn.close()
        started.remove((process, conn))

    try:
        ready, block, reap = [], [], []
        for run in range(WARMUP + RUNS):
            process, conn, blocked, took = start()
            t3 = time.perf_counter()
            kill(process)
            process.join(WAIT)
            t4 = time.perf_counter()
            if process.exitcode is None:
                raise Broken(f"project child {process.pid} survived SIGKILL")
            finish(process, conn)
            if run >= WARMUP:
                ready.append(took * 1e3)
                block.append(blocked * 1e3)
                reap.append((t4 - t3) * 1e3)
        results["ready_ms"]["a"] = summary(ready)
        results["start_block_ms"]["a"] = summary(block)
        results["kill_reap_ms"]["a"] = summary(reap)

        memory(started_children=[start()[:2] for _ in range(ALIVE)],
               kill=kill, finish=finish, key="a", server_pid=server_pid, results=results)

        # 3 (i)-(iii): one real contained child plus forked echo children, in turns.
        log("round trips: sandbox child and forked echo children, in turns")
        process, conn, _, _ = start()
        round_trips(conn.fileno(), tracker, results)
        kill(process)
        process.join(WAIT)
        finish(process, conn)
    finally:
        for process, conn in list(started):
            kill(process)
            process.join(WAIT)
            if process.exitcode is not None:
                process.close()
            conn.close()
        sandbox_process.release_forkserver()


def memory(started_children: list[tuple[Any, Any]], kill: Callable[[Any], None],
           finish: Callable[[Any, Any], None], key: str, server_pid: int | None,
           results: dict[str, Any]) -> None:
    """PSS/USS of ALIVE ready children (and their fork server), then kill them at once."""
    time.sleep(0.3)  # let every child block in its read; late page faults settle
    pss, uss = [], []
    for process, _ in started_children:
        child_pss, child_uss = smaps(process.pid)
        pss.append(child_pss)
        uss.append(child_uss)
    server_pss = smaps(server_pid)[0] if server_pid is not None else 0.0
    results["pss_mib"][key] = summary(pss)
    results["uss_mib"][key] = summary(uss)
    results["server_pss_mib"][key] = server_pss
    results["all_in_pss_mib"][key] = (sum(pss) + server_pss) / len(pss)
    t0 = time.perf_counter()
    for process, _ in started_children:
        kill(process)
    for process, _ in started_children:
        process.join(WAIT)
        if process.exitcode is None:
            raise Broken(f"child {process.pid} survived SIGKILL")
    results["burst_kill_reap_ms"][key] = (time.perf_counter() - t0) * 1e3
    for process, conn in started_children:
        finish(process, conn)


# ── 1, 2, 4 for the stock contexts ───────────────────────────────────────────


def stock_context(method: str, key: str, tracker: Tracker, results: dict[str, Any]) -> None:
    ctx = multiprocessing.get_context(method)
    started: list[tuple[Any, Any]] = []
    reexec: list[float] = []
    to_target: list[float] = []

    def start() -> tuple[Any, Any, float, float]:
        t0 = time.perf_counter()
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(target=trivial_ready, args=(child_conn,), daemon=True)
        process.start()
        t1 = time.perf_counter()
        child_conn.close()
        started.append((process, parent_conn))
        tracker.add(process.pid, f"{method} child")
        wait_readable(parent_conn.fileno())
        message = parent_conn.recv_bytes()
        t2 = time.perf_counter()
        word, *stamps = message.decode().split()
        if word != "ready" or len(stamps) != 3:
            raise Broken(f"a {method} child sent {message!r}, not its ready message")
        exec_started, exec_done, entered = map(float, stamps)
        if exec_started > t0:  # the child re-ran this module (not a fork's copy of it)
            reexec.append((exec_done - exec_started) * 1e3)
        to_target.append((entered - t0) * 1e3)
        return process, parent_conn, t1 - t0, t2 - t0

    def kill(process: Any) -> None:
        try:
            os.kill(process.pid, signal.SIGKILL)  # its group is ours: never killpg here
        except ProcessLookupError:
            pass

    def finish(process: Any, conn: Any) -> None:
        process.close()
        conn.close()
        started.remove((process, conn))

    try:
        ready, block, reap = [], [], []
        for run in range(WARMUP + RUNS):
            process, conn, blocked, took = start()
            t3 = time.perf_counter()
            kill(process)
            process.join(WAIT)
            t4 = time.perf_counter()
            finish(process, conn)
            if run >= WARMUP:
                ready.append(took * 1e3)
                block.append(blocked * 1e3)
                reap.append((t4 - t3) * 1e3)
        results["ready_ms"][key] = summary(ready)
        results["start_block_ms"][key] = summary(block)
        results["kill_reap_ms"][key] = summary(reap)
        results["main_rerun_ms"][key] = summary(reexec[-RUNS:]) if reexec else None
        results["to_target_ms"][key] = summary(to_target[-RUNS:])
        server_pid = helper_pids()[0] if method == "forkserver" else None
        memory(started_children=[start()[:2] for _ in range(ALIVE)],
               kill=kill, finish=finish, key=key, server_pid=server_pid, results=results)
    finally:
        for process, conn in list(started):
            kill(process)
            process.join(WAIT)
            if process.exitcode is not None:
                process.close()
            conn.close()


# ── 3. round trips ───────────────────────────────────────────────────────────


IPC_BLOCK = 100
"""Round trips per case in a row; the cases take turns so that noise hits all alike."""


def interleaved(steps: dict[str, Callable[[int], None]]) -> dict[str, dict[str, float]]:
    """IPC_N timed round trips per case after IPC_WARMUP, in turns of IPC_BLOCK."""
    for step in steps.values():
        for i in range(IPC_WARMUP):
            step(i + 1)
    samples: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for turn in range(IPC_N // IPC_BLOCK):
        for key in order[turn % len(order):] + order[:turn % len(order)]:
            step, kept = steps[key], samples[key]
            for i in range(IPC_BLOCK):
                t0 = time.perf_counter_ns()
                step(IPC_WARMUP + turn * IPC_BLOCK + i + 1)
                kept.append((time.perf_counter_ns() - t0) / 1e3)
    return {key: summary(kept) for key, kept in samples.items()}


def round_trips(sandbox_fd: int, tracker: Tracker, results: dict[str, Any]) -> None:
    """(i) against the real sandbox child and a forked echo child, (ii), (iii): all
    blocking on the host, measured in turns. The echo children are forked from this
    (still single-threaded) process."""
    import msgspec

    from sandbox import wire

    encoder = msgspec.msgpack.Encoder()

    def framed_step(fd: int) -> Callable[[int], None]:
        def step(i: int) -> None:
            frame = wire.encode(wire.Ping(id=i))
            if os.write(fd, frame) != len(frame):
                raise Broken("short write")
            reply = wire.read_frame(fd)
            if reply is None:
                raise Broken("the echo child closed the channel")
            pong = wire.decode_reply(reply)
            if not isinstance(pong, wire.Pong) or pong.id != i:
                raise Broken(f"wrong reply {pong!r}")
        return step

    def msgspec_step(conn: Any) -> Callable[[int], None]:
        def step(i: int) -> None:
            conn.send_bytes(encoder.encode(wire.Ping(id=i)))
            pong = wire.decode_reply(conn.recv_bytes())
            if not isinstance(pong, wire.Pong) or pong.id != i:
                raise Broken(f"wrong reply {pong!r}")
        return step

    def pickle_step(conn: Any) -> Callable[[int], None]:
        def step(i: int) -> None:
            conn.send({"kind": "Ping", "id": i})
            pong = conn.recv()
            if pong.get("kind") != "Pong" or pong.get("id") != i:
                raise Broken(f"wrong reply {pong!r}")
        return step

    import threading

    if threading.active_count() != 1:
        raise Broken(f"{threading.active_count()} threads alive: fork would not be safe")
    ctx = multiprocessing.get_context("fork")
    echoes: list[tuple[Any, Any]] = []
    steps: dict[str, Callable[[int], None]] = {"i_sandbox_child": framed_step(sandbox_fd)}
    try:
        for key, target, make_step in (
            ("i_fork_echo", echo_framed, lambda conn: framed_step(conn.fileno())),
            ("ii_conn_bytes_msgspec", echo_msgspec, msgspec_step),
            ("iii_conn_pickle", echo_pickle, pickle_step),
        ):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            process = ctx.Process(target=target, args=(child_conn,), daemon=True)
            process.start()
            child_conn.close()
            echoes.append((process, parent_conn))
            tracker.add(process.pid, f"fork echo child ({key})")
            steps[key] = make_step(parent_conn)
        results["rtt_us"].update(interleaved(steps))
    finally:
        # A forked child holds copies of our fds (its parent_conn, the fork server's
        # alive pipe), so closing ours sends it no EOF: stop it by PID, before the
        # fork server is released (which waits for that pipe to close).
        for process, parent_conn in echoes:
            os.kill(process.pid, signal.SIGKILL)
            process.join(WAIT)
            process.close()
            parent_conn.close()


def round_trips_pool(tracker: Tracker, results: dict[str, Any]) -> None:
    """(iv) ``Sandbox.ping()`` through the real Pool on asyncio."""
    import asyncio
    import shutil
    import tempfile

    from sandbox import Pool, Sandbox, SandboxConfig
    from sandbox import process as sandbox_process

    # The stock phases reset the (process-wide) fork server's preload; put ours back.
    sandbox_process._context.set_forkserver_preload(["sandbox.child", "sandbox.forkserver_init"])
    directory = tempfile.mkdtemp(prefix="troupe-startmethods-")
    with open(os.path.join(directory, "probe.py"), "w") as source:
        source.write(
            'CHARACTER_NAME = "Probe"\n'
            'VOICE_SOURCE = {"source_type": "file", "path_on_server": "voices/probe.wav"}\n'
            'INSTRUCTIONS = {"text": "You are Probe."}\n'
            'METADATA = {"good": True, "comment": None}\n'
            "\n"
            "class PromptGenerator:\n"
            "    def __init__(self, instructions):\n"
            "        self.instructions = instructions\n"
            "\n"
            "    def make_system_prompt(self):\n"
            '        return self.instructions["text"]\n'
        )

    async def run() -> None:
        pool = Pool(SandboxConfig(pool_size=1))
        await pool.start()
        server_pid, tracker_pid = helper_pids()
        tracker.add(server_pid, "project fork server (pool)")
        tracker.add(tracker_pid, "resource tracker (pool)")
        try:
            box = Sandbox(pool, label="startmethods")
            report = await box.start(directory)
            if [c.name for c in report.characters] != ["Probe"] or report.errors:
                raise Broken(f"the probe directory did not load cleanly: {report.errors}")
            for _ in range(int(WAIT / 0.01)):  # the refill must not run beside the pings
                for pid in pool.live_pids:
                    tracker.add(pid, "pool child")
                if pool.idle >= 1:
                    break
                await asyncio.sleep(0.01)
            for _ in range(IPC_WARMUP):
                await box.ping()
            samples = []
            for _ in range(IPC_N):
                t0 = time.perf_counter_ns()
                await box.ping()
                samples.append((time.perf_counter_ns() - t0) / 1e3)
            results["rtt_us"]["iv_sandbox_ping_asyncio"] = summary(samples)
            await box.close()
        finally:
            await pool.close()

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ── output ───────────────────────────────────────────────────────────────────

METHODS = {
    "a": "a  project forkserver (preload+freeze, lean Popen)",
    "b": "b  stock forkserver, trivial target",
    "c": "c  spawn, trivial target",
    "d": "d  fork, trivial target",
}
METHOD_NOTES = {
    "a": "incl. containment: setsid, user+net ns, fd close, rlimits",
    "b": "child re-runs this module as __mp_main__ (see below)",
    "c": "fresh interpreter, then re-runs this module",
    "d": "copy of this process; not for the server (see below)",
}
RTT = {
    "i_sandbox_child": ("i   our framing, raw fd, real sandbox child",
                        "wire.encode + read_frame, blocking host"),
    "i_fork_echo": ("i   our framing, raw fd, forked echo child", "same framing, bare child"),
    "ii_conn_bytes_msgspec": ("ii  Connection.send_bytes/recv_bytes + msgspec",
                              "forked echo child"),
    "iii_conn_pickle": ("iii Connection.send/recv, pickled dict", "forked echo child"),
    "iv_sandbox_ping_asyncio": ("iv  Sandbox.ping() via Pool, asyncio",
                                "lock+timeout+add_reader+Queue on host"),
}


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def section(title: str) -> None:
        rows.append((title, "", "", ""))

    def add(label: str, stats: dict[str, float] | None, unit: str, note: str,
            digits: int = 2) -> None:
        if stats is None:
            rows.append((label, "-", "-", note))
            return
        p50, p99 = stats["p50"], stats["p99"]
        rows.append((label, f"{p50:.{digits}f} {unit}", f"{p99:.{digits}f} {unit}", note))

    section(f"1. child ready: ask → first message  ({RUNS} runs after {WARMUP} warm-ups)")
    for key, label in METHODS.items():
        add("  " + label, results["ready_ms"].get(key), "ms", METHOD_NOTES[key])
    section("1. where the trivial targets' ready time goes")
    compile_ms = results.get("module_compile_ms", 0.0)
    for key in ("b", "c", "d"):
        label = METHODS[key][:2]
        add(f"  {label} ask → target entered", results["to_target_ms"].get(key), "ms",
            "the rest is the ready message's trip back")
        if results["main_rerun_ms"].get(key):
            add(f"  {label}   of which: re-run of this module's top level",
                results["main_rerun_ms"][key], "ms",
                f"imports + defs; plus ~{compile_ms:.1f} ms compiling it (no .pyc here)")
    section(f"1. PSS per child, {ALIVE} alive  (p99 ≈ max of {ALIVE})")
    for key, label in METHODS.items():
        stats = results["pss_mib"].get(key)
        note = ""
        if stats is not None:
            note = f"USS {results['uss_mib'][key]['p50']:.2f}"
            if results["server_pss_mib"].get(key):
                note += (f"; fork server {results['server_pss_mib'][key]:.1f}, all-in "
                         f"{results['all_in_pss_mib'][key]:.2f}/child")
            elif key == "d":
                note += "; shares this process's heap (hides its cost)"
        add("  " + label, stats, "MiB", note)
    section("2. blocking time of a start: Pipe + Process + start()  (stalls a loop)")
    for key, label in METHODS.items():
        note = {"a": "whole _start_process(); waits for the fork server's pid",
                "c": "fork/exec of the interpreter",
                "d": "os.fork() of this process"}.get(key, "")
        add("  " + label, results["start_block_ms"].get(key), "ms", note)
    section(f"3. round trip, Ping→Pong-sized  ({IPC_N} after {IPC_WARMUP} warm-ups; "
            f"i-iii in turns of {IPC_BLOCK})")
    for key, (label, note) in RTT.items():
        add("  " + label, results["rtt_us"].get(key), "µs", note, digits=1)
    section("4. SIGKILL + reap of one child (until join() returns)")
    for key, label in METHODS.items():
        burst = results["burst_kill_reap_ms"].get(key)
        note = f"{ALIVE} at once: {burst:.1f} ms" if burst is not None else ""
        if key == "a":
            note += "; killpg + kill, fork server reaps"
        add("  " + label, results["kill_reap_ms"].get(key), "ms", note)

    widths = [max(len(row[i]) for row in rows if row[1] or i == 0) for i in range(3)]
    widths[0] = max(len(row[0]) for row in rows if row[1])
    header = (f"{'':<{widths[0]}}  {'p50':>{widths[1]}}  {'p99':>{widths[2]}}  notes")
    lines = [header, "-" * (len(header) + 50)]
    for label, p50, p99, note in rows:
        if not p50:
            lines.append(label)
        else:
            lines.append(f"{label:<{widths[0]}}  {p50:>{widths[1]}}  {p99:>{widths[2]}}  {note}")
    return "\n".join(lines)


FOOTNOTES = """\
Notes:
- Why the server does not use fork (d) despite its numbers: the server is a
  multi-threaded asyncio process (executor threads, aiohttp) and fork copies only the
  calling thread, so locks held by other threads stay locked in the child; and it
  holds secrets (API keys, tokens, session state) in memory, which fork copies into
  every child where character code could read them. The fork server is started once
  with a scrubbed environment, before any session exists.
- b and c run with -m, which does NOT stop the stock re-run of the main module: the
  child gets init_main_from_name and runpy-runs this module's top level as
  __mp_main__ (only its `if __name__ == "__main__"` block is skipped); run as a file
  it would runpy the path instead. This module keeps its top level to a few stdlib
  imports, but it is compiled from source in every child (PYTHONDONTWRITEBYTECODE=1
  here, so no .pyc). A heavy main (pytest, the server) makes this the ~200 ms /
  ~29 MiB per child of DESIGN.md section 4 (CPython gh-137996); the project's lean
  Popen (a) sends no main module at all.
- p99 of 50 runs is close to the worst run; p99 of the 2000 round trips is a real tail.
- PSS splits each shared page among the processes that map it: fork-server children
  share with their fork server (shown as all-in), fork children share with this process."""


def flatten(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    names = {"a": "project_forkserver", "b": "stock_forkserver", "c": "spawn", "d": "fork"}
    flat: dict[str, Any] = dict(meta)
    for metric, unit in (("ready", "ms"), ("start_block", "ms"), ("kill_reap", "ms"),
                         ("pss", "mib"), ("uss", "mib")):
        for key, stats in results[f"{metric}_{unit}"].items():
            for stat in ("p50", "p99"):
                flat[f"{metric}_{names[key]}_{stat}_{unit}"] = round(stats[stat], 4)
    for metric, unit in (("server_pss", "mib"), ("all_in_pss", "mib"),
                         ("burst_kill_reap", "ms")):
        for key, value in results[f"{metric}_{unit}"].items():
            flat[f"{metric}_{names[key]}_{unit}"] = round(value, 4)
    for metric in ("main_rerun", "to_target"):
        for key, stats in results[f"{metric}_ms"].items():
            if stats is not None:
                for stat in ("p50", "p99"):
                    flat[f"{metric}_{names[key]}_{stat}_ms"] = round(stats[stat], 4)
    for key, stats in results["rtt_us"].items():
        for stat in ("p50", "p99"):
            flat[f"rtt_{key}_{stat}_us"] = round(stats[stat], 2)
    return flat


# ── main ─────────────────────────────────────────────────────────────────────


def _alarm(signum: int, frame: Any) -> None:
    raise Broken(f"the run took longer than {DEADLINE} s")


def module_compile_ms() -> float:
    """What compiling this module costs a child that re-runs it (no bytecode cache is
    written when PYTHONDONTWRITEBYTECODE is set, so every child compiles it)."""
    with open(__file__, "rb") as source:
        text = source.read()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        compile(text, __file__, "exec", dont_inherit=True)
        samples.append((time.perf_counter() - t0) * 1e3)
    return percentile(samples, 50)


def main() -> int:
    import json
    import platform
    import threading

    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(DEADLINE)
    tracker = Tracker()
    results: dict[str, Any] = {
        name: {} for name in ("ready_ms", "start_block_ms", "kill_reap_ms", "pss_mib",
                              "uss_mib", "server_pss_mib", "all_in_pss_mib",
                              "burst_kill_reap_ms", "rtt_us", "main_rerun_ms", "to_target_ms")
    }
    failure = None
    threads_at_fork = None
    results["module_compile_ms"] = module_compile_ms()
    try:
        log("a: project fork server")
        project_path(tracker, results)

        log("b: stock forkserver")
        fs_ctx = multiprocessing.get_context("forkserver")
        fs_ctx.set_forkserver_preload(["__main__"])  # the stock default; under -m a no-op
        try:
            multiprocessing.forkserver.ensure_running()
            server_pid, tracker_pid = helper_pids()
            tracker.add(server_pid, "stock fork server")
            tracker.add(tracker_pid, "resource tracker (stock fork server)")
            stock_context("forkserver", "b", tracker, results)
        finally:
            stop_stock_helpers()

        log("c: spawn")
        try:
            stock_context("spawn", "c", tracker, results)
            tracker.add(helper_pids()[1], "resource tracker (spawn)")
        finally:
            stop_stock_helpers()

        log("d: fork")
        threads_at_fork = threading.active_count()
        if threads_at_fork != 1:
            raise Broken(f"{threads_at_fork} threads alive: fork would not be safe")
        stock_context("fork", "d", tracker, results)

        log("round trips: Pool + Sandbox on asyncio")
        round_trips_pool(tracker, results)
    except BaseException as exc:  # report what was measured, still clean up
        failure = f"{type(exc).__name__}: {exc}"
        log(f"broken: {failure}")
    finally:
        signal.alarm(0)
        time.sleep(0.1)  # give the fork servers' SIGCHLD loops a moment to reap
        killed = tracker.kill_leftovers()
        if killed:
            log(f"had to kill leftovers: {killed}")
    left = tracker.leftovers()
    zombies_or_children = our_children()
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "warmup": WARMUP,
        "runs": RUNS,
        "alive_for_pss": ALIVE,
        "ipc_round_trips": IPC_N,
        "threads_at_fork": threads_at_fork,
        "module_compile_ms": round(results["module_compile_ms"], 3),
        "processes_started": len(tracker.pids),
        "leftover_processes": len(left) + len(zombies_or_children),
        "killed_at_cleanup": len(killed),
        "seconds": round(time.perf_counter() - started, 2),
        "error": failure,
    }
    print(table(results))
    print()
    print(FOOTNOTES)
    print()
    print(f"Started {len(tracker.pids)} processes; left alive: {len(left)}; "
          f"children of this process still listed: {len(zombies_or_children)}; "
          f"{meta['seconds']:.1f} s" + (f"; BROKEN: {failure}" if failure else ""))
    print(json.dumps(flatten(results, meta), sort_keys=False))
    return 1 if failure or left or zombies_or_children else 0


_EXEC_DONE = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
