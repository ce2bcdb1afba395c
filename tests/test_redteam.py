"""A second red-team pass: attacks from one hostile character file found after the
containment suite (tests/test_containment.py), each asserted to FAIL from outside the
sandbox. The docstrings say what each attack did before its fix.

Run alone: ``.venv/bin/python -m pytest tests/test_redteam.py -x -q``.
Every loop and allocation is bounded; nothing is left running.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from conftest import SCALE, MakeServer, Realtime, character_source, write_directory
from test_containment import (
    SECRET,
    attack_source,
    failed,
    sandbox_pid,
    strays,
)

from server.app import POOL, SESSIONS

MIB = 1024 * 1024


async def run_attack(session: Realtime, root: Path, name: str, body: str) -> dict[str, str]:
    """test_containment's harness, with the load errors in the failure message."""
    directory = write_directory(root, name.lower(), {"attack.py": attack_source(name, body)})
    reloaded = await session.reload(directory)
    assert reloaded["type"] == "session.characters.reloaded", json.dumps(reloaded)[:2000]
    assert reloaded["errors"] == [], reloaded["errors"]
    result: dict[str, str] = json.loads(reloaded["characters"][0]["comment"])
    return result


def proc_text(name: str) -> str:
    return Path("/proc", name).read_text().strip()


def sandbox_config(config: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(config.sandbox, **changes)


def meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def status_field(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def inotify_instances() -> int:
    """inotify instances open anywhere on the host (all are root's here)."""
    count = 0
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == "anon_inode:inotify":
                        count += 1
                except OSError:
                    pass
        except OSError:
            pass
    return count


async def session_on(server: TestClient, connect_to: Any) -> Realtime:
    session: Realtime = await connect_to(server)
    await session.names()  # the default set is loaded
    return session


# ── 1. SysV shared memory: RLIMIT_AS does not count it ─────────────────────────


async def test_sysv_shm_is_bounded_by_the_memory_limit(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    """Was a finding. The child has its own IPC namespace (shmmax/shmall at
    their huge defaults) and no seccomp rule on shmget/shmat. Memory in a detached
    SysV segment counts against no rlimit (RLIMIT_AS only covers mappings), so one
    file can pin host RAM far beyond ``memory_mb`` — 10 segments of 128 MiB here,
    1.25 GiB against a 384 MiB limit; unbounded in principle (host OOM)."""
    server = await make_server(sandbox=sandbox_config(config, file_timeout=10.0 * SCALE))
    attacker = await session_on(server, connect_to)
    limit_mib = config.sandbox.limits.memory_mb
    before = meminfo_kb("Shmem")

    result = await run_attack(attacker, allowed_root, "Hoarder", """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.restype = ctypes.c_int
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        libc.shmat.restype = ctypes.c_void_p
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmdt.argtypes = [ctypes.c_void_p]
        SEGMENT = 128 << 20
        def hoard():
            made = 0
            for _ in range(10):  # bounded: 1.25 GiB
                shm = libc.shmget(0, SEGMENT, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
                if shm < 0:
                    raise OSError(ctypes.get_errno(), "shmget")
                address = libc.shmat(shm, None, 0)
                if address is None or address == ctypes.c_void_p(-1).value:
                    raise OSError(ctypes.get_errno(), "shmat")
                ctypes.memset(address, 1, SEGMENT)
                libc.shmdt(address)
                made += SEGMENT
            return made
        attempt("shm", hoard)
        """)
    held_mib = (meminfo_kb("Shmem") - before) // 1024
    pid = sandbox_pid(server)
    rss_mib = status_field(pid, "VmRSS") // 1024
    await attacker.ws.close()
    for _ in range(int(100 * SCALE)):  # the IPC namespace dies with the child
        if meminfo_kb("Shmem") - before < 64 * 1024:
            break
        await asyncio.sleep(0.05)
    assert meminfo_kb("Shmem") - before < 64 * 1024, "segments outlived the sandbox"
    assert held_mib < limit_mib, (
        f"the sandbox pinned {held_mib} MiB of shared memory (its RSS: {rss_mib} MiB) "
        f"with a {limit_mib} MiB memory limit: {result}"
    )


# ── 2. Host-side decoding: an 8 MiB reply becomes ~560 MiB in the server ──────


AMPLIFIER = textwrap.dedent("""
    CHARACTER_NAME = "Balloon"
    # 8,000,000 one-byte msgpack maps: the reply frame stays under MAX_FRAME (8 MiB),
    # the server decodes it into 8,000,000 distinct dicts (~70 bytes each).
    VOICE_SOURCE = {"source_type": "file", "path_on_server": "voices/x.wav",
                    "pad": [{}] * 8_000_000}
    INSTRUCTIONS = {"text": "hi"}
    METADATA = {"good": True, "comment": None}

    class PromptGenerator:
        def __init__(self, instructions):
            self.instructions = instructions

        def make_system_prompt(self):
            return "hi"
    """)


def rss_mib() -> int:
    return status_field("self", "VmRSS") // 1024


async def test_small_replies_do_not_become_huge_in_the_server(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    """Was a finding. ``CharacterInfo.voice_source`` is ``dict[str, Any]`` and
    replies are limited by bytes only (8 MiB). A VOICE_SOURCE padded with 8 M empty
    dicts passes the child's JSON check and fits a frame; the host decodes it into
    ~560 MiB of Python objects, keeps them for the session's life (LoadReport), and
    decodes them again on every ``session.characters.list`` — each time stalling the
    event loop (every session's audio) for about a second. Two sessions here; 200 are
    allowed by default."""
    server = await make_server(sandbox=sandbox_config(
        config, file_timeout=20.0 * SCALE, load_timeout=40.0 * SCALE,
        call_timeout=20.0 * SCALE))
    bystander = await session_on(server, connect_to)
    directory = write_directory(allowed_root, "balloon", {"balloon.py": AMPLIFIER})
    gc.collect()
    baseline = rss_mib()

    attackers = []
    for _ in range(2):
        attacker = await session_on(server, connect_to)
        reloaded = await attacker.reload(directory)
        # Refused now: VOICE_SOURCE is typed and bounded on both sides of the wire.
        assert reloaded["type"] == "error", str(reloaded)[:500]
        assert "InvalidVoiceSource" in json.dumps(reloaded["error"]["details"])
        attackers.append(attacker)
    gc.collect()
    held = rss_mib() - baseline
    kept = [len(s.characters.report.characters[0].voice_source["pad"])
            for s in server.app[SESSIONS].values()
            if s.characters.report and s.characters.report.characters
            and "pad" in s.characters.report.characters[0].voice_source]

    # Event-loop stall while one attacker lists its characters.
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        for _ in range(2000):  # bounded
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    listed = await attackers[0].request({"type": "session.characters.list"}, within=60)
    ticker.cancel()
    stall = max(gaps) if gaps else 0.0
    assert listed["type"] == "session.characters.listed", str(listed)[:300]  # defaults
    assert await bystander.names()
    for attacker in attackers:
        await attacker.ws.close()

    assert held < 200 and stall < 0.25, (
        f"two sessions made the server hold {held} MiB more (decoded pads kept: {kept}); "
        f"one list stalled the event loop for {stall:.2f} s"
    )


# ── 3. Threads: RLIMIT_NPROC does not apply to root; pids are host-wide ───────


async def test_threads_are_capped(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    """Was a finding (when the server runs as root). ``processes=64`` is
    RLIMIT_NPROC, which the kernel does not enforce for uid 0, and seccomp allows
    every clone with CLONE_THREAD. Each thread takes a pid in the host's namespace
    (pid_max 32768 here). Python threads stop near 500 (address space), but
    threads made with a raw clone() that only sleep in pause() need no stack: 3000
    below, bounded; ~30000 in one file exhaust the host's pids (no process anywhere
    on the machine can fork; the zygote cannot start children)."""
    server = await make_server(sandbox=sandbox_config(config, file_timeout=10.0 * SCALE))
    attacker = await session_on(server, connect_to)
    bystander = await session_on(server, connect_to)

    result = await run_attack(attacker, allowed_root, "Swarm", textwrap.dedent(RAW_CLONE)
                              + textwrap.dedent("""
        import threading
        threading.stack_size(32 * 1024)
        def raw_swarm():
            # Threads that only ever sleep in pause(): no stack of their own, so no
            # address space either; only a pid (and ~20 KiB of kernel memory) each.
            made = 0
            try:
                for _ in range(3000):  # bounded
                    raw_clone(BASE | FS | FILES, forever=True)
                    made += 1
            except OSError as exc:
                return f"{made}, then {exc}"
            return made
        attempt("raw threads", raw_swarm)
        _stop = threading.Event()
        def swarm():
            started = 0
            for _ in range(400):  # bounded (the address space allows ~500)
                threading.Thread(target=_stop.wait, daemon=True).start()
                started += 1
            return started
        attempt("python threads", swarm)
        """))
    pid = sandbox_pid(server, 0)
    threads = status_field(pid, "Threads")
    await bystander_names_ok(bystander)
    await attacker.ws.close()
    assert threads <= config.sandbox.limits.processes, (
        f"one sandbox runs {threads} threads (pids of the host; pid_max "
        f"{proc_text('sys/kernel/pid_max')}); uid {os.geteuid()}: {result}"
    )


async def bystander_names_ok(session: Realtime) -> None:
    assert await session.names()


# ── 4. The idle-CPU watchdog looks away whenever a request came in ─────────────


async def test_a_burning_thread_is_stopped_even_when_the_client_keeps_asking(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    """Was a finding: ``Pool._watch_idle_cpu`` skipped a child whose request count
    changed since the last sample, so with its own client sending
    ``session.characters.list`` more often than ``idle_check_interval``, a thread left
    burning at load was never charged and burned a core until RLIMIT_CPU. Now the
    watchdog charges the CPU used beyond the time spent serving requests, and threads
    are refused (a timer drives the loop here). What remains by design: CPU used while
    a request of the session is outstanding counts as work (each bounded by the call
    deadline), as a slow tool's would. Bounded to ~4 s."""
    server = await make_server(sandbox=sandbox_config(
        config, idle_check_interval=1.0, idle_cpu_seconds=0.05))
    attacker = await session_on(server, connect_to)
    result = await run_attack(attacker, allowed_root, "Stoker", """
        import signal, threading, time
        attempt("thread", lambda: threading.Thread(target=lambda: None).start())
        stop = time.monotonic() + 6.0  # bounded even if nothing stops it
        def burn(*_):  # 0.25 s of every 0.3 s, between and during requests
            end = min(time.monotonic() + 0.25, stop)
            while time.monotonic() < end:
                pass
        signal.signal(signal.SIGALRM, burn)
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.3)
        """)
    assert result["thread"].startswith("failed")  # no threads at all now
    pid = sandbox_pid(server)
    start = cpu_ticks(pid)
    events = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and alive(pid):
        event = await attacker.request({"type": "session.characters.list"})
        events.append(event["type"])
        await asyncio.sleep(0.3)
    burned = (cpu_ticks(pid) - start) / os.sysconf("SC_CLK_TCK")
    still_alive = alive(pid)
    await attacker.ws.close()
    assert not still_alive, (
        f"the burning sandbox lived through the test, {burned:.1f} s of CPU in ~4 s "
        f"(watchdog: 0.05 s per 1 s); events: {sorted(set(events))}"
    )


# ── 5. inotify: outside Landlock, and a per-user count shared with the host ────


async def test_inotify_sees_no_names_outside_the_directory(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, tmp_path: Path
) -> None:
    """Was a finding. Landlock covers no fsnotify: a child may watch any
    directory it can name (the host's /tmp, another session's directory, a 0700
    directory of the server) and learn the names of files created there."""
    server = await make_server()
    attacker = await session_on(server, connect_to)
    private = tmp_path / "outside-private"
    private.mkdir(mode=0o700)
    other_session = allowed_root / "someone-elses"
    other_session.mkdir()

    await run_attack(attacker, allowed_root, "Watcher", f"""
        import ctypes, gc, struct, threading
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init()
        for path in ({str(private)!r}, {str(other_session)!r}):
            libc.inotify_add_watch(fd, path.encode(), 0x100)  # IN_CREATE
        def listen():
            seen = []
            for _ in range(16):  # bounded
                data = os.read(fd, 4096)
                offset = 0
                while offset < len(data):
                    _, _, _, size = struct.unpack_from("iIII", data, offset)
                    seen.append(data[offset + 16: offset + 16 + size].rstrip(b"\\0").decode())
                    offset += 16 + size
                for obj in gc.get_objects():
                    if type(obj).__name__ == "CharacterInfo":
                        obj.comment = json.dumps(seen)
        if fd >= 0:
            threading.Thread(target=listen, daemon=True).start()
        """)
    (private / f"{SECRET}.key").write_text("x")
    (other_session / "their_character.py").write_text("x")
    await asyncio.sleep(0.3)
    listed = await attacker.request({"type": "session.characters.list"})
    comment = listed["characters"][0]["comment"] or ""
    await attacker.ws.close()
    assert SECRET not in comment and "their_character" not in comment, comment


async def test_inotify_instances_of_the_host_cannot_be_used_up(
    make_server: MakeServer, connect_to: Any, allowed_root: Path
) -> None:
    """Was a finding (root server). inotify instances are counted per user
    (fs.inotify.max_user_instances, 128 here) up the user-namespace chain: a child,
    uid 0 unmapped, charges root of the host. Three sessions holding ~60 each leave
    no instance for any root process of the machine (EMFILE) while they live.
    Held ~1 s, then released."""
    limit = int(proc_text("sys/fs/inotify/max_user_instances"))
    before = inotify_instances()
    server = await make_server()
    attackers = [await session_on(server, connect_to) for _ in range(3)]
    body = """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        HELD = []
        def hold():
            for _ in range(64):  # bounded by RLIMIT_NOFILE anyway
                fd = libc.inotify_init()
                if fd < 0:
                    break
                HELD.append(fd)
            return len(HELD)
        attempt("inotify", hold)
        """
    results = [await run_attack(a, allowed_root, f"Hog{i}", body)
               for i, a in enumerate(attackers)]
    during = inotify_instances()
    libc = ctypes.CDLL(None, use_errno=True)
    mine = libc.inotify_init()
    host_error = ctypes.get_errno() if mine < 0 else 0
    if mine >= 0:
        os.close(mine)
    for attacker in attackers:
        await attacker.ws.close()
    assert host_error == 0 and during - before < limit // 4, (
        f"sandboxes held {during - before} of root's {limit} inotify instances; the "
        f"host's own inotify_init then failed with errno {host_error}: {results}"
    )


# ── 6. A reply nested too deep escapes the protocol checks ────────────────────


async def test_a_deeply_nested_reply_is_a_protocol_violation(
    make_server: MakeServer, connect_to: Any, allowed_root: Path
) -> None:
    """Was a finding (low). ``ChildProcess._on_readable`` catches
    FrameTooLarge/DecodeError/ChildDied, but msgspec raises RecursionError for deep
    nesting: it escapes into asyncio's exception handler, the frames read in the same
    batch are dropped, and the child is not killed for breaking the protocol."""
    server = await make_server()
    loop = asyncio.get_running_loop()
    escaped: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(
        lambda _, context: escaped.append(repr(context.get("exception"))))
    attacker = await session_on(server, connect_to)
    try:
        directory = write_directory(allowed_root, "nester", {"attack.py": attack_source(
            "Nester", """
            import struct
            def _is_open(fd):
                try:
                    os.fstat(fd)
                    return True
                except OSError:
                    return False
            channel = next(fd for fd in range(3, 64) if _is_open(fd))
            def deep_reply():
                # Loaded{id: 1, ..., characters: [{voice_source: {"x": [[[...]]]}}]}
                def s(text):
                    raw = text.encode()
                    return bytes([0xa0 | len(raw)]) + raw
                info = (b"\\x83" + s("name") + s("x") + s("file") + s("x.py")
                        + s("voice_source") + b"\\x81" + s("x") + b"\\x91" * 100_000 + b"\\xc0")
                payload = (b"\\x86" + s("kind") + s("Loaded") + s("id") + b"\\x01"
                           + s("directory") + s("d") + s("total_files") + b"\\x01"
                           + s("characters") + b"\\x91" + info + s("errors") + b"\\x90")
                os.write(channel, struct.pack("!I", len(payload)) + payload)
                return len(payload)
            attempt("deep", deep_reply)
            """)})
        reloaded = await attacker.reload(directory)
        assert reloaded["type"] == "error", reloaded  # the child broke the protocol: killed
        assert "protocol" in json.dumps(reloaded["error"]["details"])
    finally:
        loop.set_exception_handler(previous)
    await attacker.ws.close()
    assert escaped == [], f"an exception escaped the host's reader: {escaped}"


# ── 7. Metadata outside Landlock ───────────────────────────────────────────────


@pytest.mark.xfail(strict=True, reason="known limitation: Landlock does not cover stat, "
                   "readlink or path walks (README, Security model); a mount namespace "
                   "with a minimal root would")
async def test_files_outside_cannot_even_be_probed(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, tmp_path: Path
) -> None:
    """Was a finding (low). Landlock does not cover stat/readlink/path walk:
    the sandbox learns whether a file exists anywhere, its size, owner and times,
    and which pids run on the host (stat of /proc/<pid>)."""
    server = await make_server()
    attacker = await session_on(server, connect_to)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    secret.chmod(0o600)
    result = await run_attack(attacker, allowed_root, "Prober", f"""
        attempt("stat secret", lambda: os.stat({str(secret)!r}).st_size)
        attempt("host pid", lambda: os.stat("/proc/{os.getpid()}").st_uid)
        attempt("readlink /proc/self/exe", lambda: os.readlink("/proc/self/exe"))
        attempt("stat /root", lambda: os.stat("/root").st_mode)
        """)
    await attacker.ws.close()
    assert failed(result) == {}, result


# ── Regressions: attacks that fail today ───────────────────────────────────────


async def test_the_i386_syscall_abi_is_no_way_around_seccomp(
    make_server: MakeServer, connect_to: Any, allowed_root: Path
) -> None:
    """fork through ``int 0x80`` (i386 ABI; IA32 emulation is on): the
    filter's architecture check kills the child (SIGSYS) before any fork."""
    server = await make_server()
    attacker = await session_on(server, connect_to)
    pool = server.app[POOL]
    source = textwrap.dedent("""
        import ctypes, mmap, os
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        # mov eax, 2 (i386 fork); int 0x80; movsxd rax, eax; ret
        page.write(bytes([0xb8, 2, 0, 0, 0, 0xcd, 0x80, 0x48, 0x63, 0xc0, 0xc3]))
        run = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        if run() == 0:
            import time
            time.sleep(30)  # the forked copy, if any: lingers to be found
            os._exit(0)
        """) + character_source("Legacy")
    directory = write_directory(allowed_root, "legacy",
                                {"a_int80.py": source, "b_ok.py": character_source("Fine")})
    reloaded = await attacker.reload(directory)
    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert {e["file"]: e["error_type"] for e in reloaded["errors"]} == {"a_int80.py": "Crashed"}
    assert await strays(pool) == set()
    await attacker.ws.close()


RAW_CLONE = """
    import ctypes, mmap, struct, time
    PAGES = []  # kept mapped: a new thread may still be running its code
    def raw_clone(flags, forever=False):
        # mov eax, 56 (clone); mov rdi, flags; lea rsi, [rip + stack top]; xor edx, edx;
        # xor r10d, r10d; xor r8d, r8d; syscall; test rax, rax; jnz out;
        # (new task) mov eax, 60 (exit); xor edi, edi; syscall;  out: ret
        if forever and PAGES and PAGES[-1][1]:
            return _checked(PAGES[-1][2]())  # pause() never touches the stack: one page for all
        page = mmap.mmap(-1, 8192, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        code = (b"\\xb8\\x38\\x00\\x00\\x00" + b"\\x48\\xbf" + struct.pack("<Q", flags)
                + b"\\x48\\x8d\\x35\\x00\\x10\\x00\\x00"  # lea rsi, [rip + 0x1000]
                + b"\\x31\\xd2\\x4d\\x31\\xd2\\x4d\\x31\\xc0\\x0f\\x05\\x48\\x85\\xc0\\x75\\x09"
                + (b"\\xb8\\x22\\x00\\x00\\x00\\x0f\\x05\\xeb\\xf7" if forever  # pause loop
                   else b"\\xb8\\x3c\\x00\\x00\\x00\\x31\\xff\\x0f\\x05")  # exit
                + b"\\xc3")
        page.write(code)
        run = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        PAGES.append((page, forever, run))
        result = run()
        if not forever:
            time.sleep(0.01)
        return _checked(result)
    def _checked(result):
        if result < 0:
            raise OSError(-result, f"after {len(PAGES)} pages: " + os.strerror(-result))
        return result
    VM, FS, FILES, SIGHAND, THREAD = 0x100, 0x200, 0x400, 0x800, 0x10000
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, PARENT = (
        0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000, 0x8000)
    BASE = VM | SIGHAND | THREAD
"""


async def test_clone_flags_beside_clone_thread_reach_nothing(
    make_server: MakeServer, connect_to: Any, allowed_root: Path
) -> None:
    """seccomp only checks CLONE_THREAD; the kernel refuses the dangerous
    combinations (NEWUSER/NEWPID with THREAD; a thread without VM), and the ones it
    allows (a thread in a new mount/UTS/net namespace) open nothing: mount, setns and
    socket stay refused. No process appears outside the pool's children."""
    server = await make_server()
    attacker = await session_on(server, connect_to)
    pool = server.app[POOL]
    result = await run_attack(attacker, allowed_root, "Cloner", textwrap.dedent(RAW_CLONE)
                              + textwrap.dedent("""
        attempt("process", lambda: raw_clone(0x11))  # SIGCHLD: a fork
        attempt("thread+newuser", lambda: raw_clone(BASE | NEWUSER))
        attempt("thread+newpid", lambda: raw_clone(BASE | NEWPID))
        attempt("vm without thread", lambda: raw_clone(VM | SIGHAND | 0x11))
        # Allowed, and harmless: a thread of this process, in namespaces of its own
        # user namespace, where mount/setns/socket stay refused.
        ALLOWED = {}
        for name, flags in (("parent", PARENT), ("newns", NEWNS), ("newnet", NEWNET),
                            ("newipc", NEWIPC), ("newuts", NEWUTS)):
            try:
                ALLOWED[name] = raw_clone(BASE | flags) > 0
            except OSError as exc:
                ALLOWED[name] = exc.strerror
        RESULT["allowed"] = "failed: " + json.dumps(ALLOWED)
        def _syscall(number, *args):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(number, *args) < 0:
                raise OSError(ctypes.get_errno(), str(number))
            return "allowed"
        attempt("vfork", lambda: _syscall(58))
        attempt("fork", lambda: _syscall(57))
        attempt("clone3", lambda: _syscall(435, None, 0))
        attempt("mount", lambda: _syscall(165, b"none", b"/tmp", b"tmpfs", 0, None))
        attempt("execveat memfd", lambda: _syscall(322, os.memfd_create("x"), b"", None,
                                                   None, 0x1000))
        """))
    # A thread in new namespaces is still this process: no stray appears.
    assert await strays(pool) == set()
    await attacker.ws.close()
    print("clone beside CLONE_THREAD:", result.pop("allowed"))
    assert failed(result) == {}, result


async def test_priority_of_host_processes_is_out_of_reach(
    make_server: MakeServer, connect_to: Any, allowed_root: Path
) -> None:
    """setpriority(PRIO_USER) and ioprio_set(IOPRIO_WHO_USER) for uid 0
    succeed inside, but the kernel skips tasks the caller's PID namespace cannot see."""
    server = await make_server()
    attacker = await session_on(server, connect_to)
    libc = ctypes.CDLL(None, use_errno=True)
    io_before = libc.syscall(252, 1, 0)  # ioprio_get(IOPRIO_WHO_PROCESS, self)
    nice_before = os.getpriority(os.PRIO_PROCESS, 0)
    zygote = server.app[POOL].zygote_pid
    await run_attack(attacker, allowed_root, "Nicer", """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        attempt("renice all of root", lambda: os.setpriority(os.PRIO_USER, 0, 19))
        attempt("renice pgrp", lambda: os.setpriority(os.PRIO_PGRP, 0, 19))
        attempt("ioprio all of root", lambda: libc.syscall(251, 3, 0, (3 << 13) | 0))
        attempt("affinity", lambda: os.sched_setaffinity(0, {0}))
        """)
    assert os.getpriority(os.PRIO_PROCESS, 0) == nice_before
    assert os.getpriority(os.PRIO_PROCESS, zygote) == nice_before
    assert libc.syscall(252, 1, 0) == io_before
    await attacker.ws.close()


async def test_output_floods_and_a_big_tool_result_leave_the_server_bounded(
    make_server: MakeServer, connect_to: Any, allowed_root: Path
) -> None:
    """Writes to fd 1/2 go to /dev/null; an over-large frame written on
    the channel by character code (announced 64 MiB) kills only its own child; a
    bystander carries on."""
    server = await make_server()
    bystander = await session_on(server, connect_to)
    attacker = await session_on(server, connect_to)
    before = rss_mib()
    source = textwrap.dedent("""
        import os, struct
        for _ in range(64):
            os.write(1, b"x" * 65536)
            os.write(2, b"y" * 65536)
        """) + character_source("Loud") + textwrap.dedent("""
        class PromptGenerator(PromptGenerator):
            def make_system_prompt(self):
                import os, struct
                for fd in range(3, 64):
                    try:
                        os.fstat(fd)
                    except OSError:
                        continue
                    os.write(fd, struct.pack("!I", 64 << 20) + b"\\0" * 65536)
                return "hi"
        """)
    reloaded = await attacker.reload(write_directory(allowed_root, "loud", {"l.py": source}))
    assert reloaded["type"] == "session.characters.reloaded", reloaded
    updated = await attacker.request({"type": "session.update",
                                      "session": {"voice": "Loud"}})
    assert updated["type"] == "error", updated
    assert await bystander.names()
    assert rss_mib() - before < 64
    await attacker.ws.close()


# ── 8. Warm directories: a load's side effects outlive the session ─────────────


async def test_nothing_a_file_holds_outlives_its_session(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    """Was a finding (with the ``warm_directories`` feature of
    sandbox/pool.py). A directory loaded twice within WARM_WINDOW is loaded once more
    in the background into a child nobody uses, and kept. The attacker's file runs
    there too: what it pins (512 MiB of SysV shm here, or thousands of pids) stays
    after the attacker's session is closed, until 4 other directories evict it."""
    server = await make_server(sandbox=sandbox_config(config, file_timeout=10.0 * SCALE))
    pool = server.app[POOL]
    attacker = await session_on(server, connect_to)
    before = meminfo_kb("Shmem")
    body = """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.restype = ctypes.c_int
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        libc.shmat.restype = ctypes.c_void_p
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmdt.argtypes = [ctypes.c_void_p]
        def hoard():
            for _ in range(4):  # bounded: 512 MiB
                shm = libc.shmget(0, 128 << 20, 0o1600)
                if shm < 0:
                    raise OSError(ctypes.get_errno(), "shmget")
                address = libc.shmat(shm, None, 0)
                ctypes.memset(address, 1, 128 << 20)
                libc.shmdt(address)
            return "held"
        attempt("shm", hoard)
        """
    await run_attack(attacker, allowed_root, "Lingerer", body)
    await run_attack(attacker, allowed_root, "Lingerer", body)  # second load: warm-up
    for _ in range(int(200 * SCALE)):  # the background preload (bounded wait)
        if pool.warm_directories:
            break
        await asyncio.sleep(0.05)
    await attacker.ws.close()
    for _ in range(int(60 * SCALE)):  # the session's own sandboxes die at close
        if (meminfo_kb("Shmem") - before) // 1024 < 64:
            break
        await asyncio.sleep(0.05)
    lingering = (meminfo_kb("Shmem") - before) // 1024
    warm = pool.warm_directories
    await pool.close()  # ends the warm child too
    assert lingering < 64, (
        f"{lingering} MiB of shared memory still held after the attacker's session "
        f"closed; directories kept warm: {warm}"
    )


# ── 9. Namespaces by the thousand through clone(CLONE_THREAD | CLONE_NEW*) ─────


def kernel_kb() -> int:
    return sum(meminfo_kb(field) for field in ("Slab", "KernelStack", "Percpu", "PageTables"))


async def test_kernel_memory_a_file_can_pin_is_bounded(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    """Was a finding. seccomp refuses unshare() but not clone() with
    CLONE_THREAD plus CLONE_NEWNET/NEWNS/NEWIPC/NEWUTS: each idle raw thread (see
    RAW_CLONE) may hold a network namespace and a copy of the host's mount table of
    its own. That kernel memory counts against no rlimit of the child. Bounded here
    to 500 threads."""
    server = await make_server(sandbox=sandbox_config(config, file_timeout=20.0 * SCALE,
                                                      load_timeout=40.0 * SCALE))
    attacker = await session_on(server, connect_to)
    before = kernel_kb()
    result = await run_attack(attacker, allowed_root, "Nester2", textwrap.dedent(RAW_CLONE)
                              + textwrap.dedent("""
        def namespaces():
            made = 0
            try:
                for _ in range(500):  # bounded
                    raw_clone(BASE | NEWNET | NEWNS | NEWIPC | NEWUTS, forever=True)
                    made += 1
            except OSError as exc:
                return f"{made}, then {exc}"
            return made
        attempt("namespaced threads", namespaces)
        """))
    pinned = (kernel_kb() - before) // 1024
    pid = sandbox_pid(server)
    threads = status_field(pid, "Threads")
    await attacker.ws.close()
    await asyncio.sleep(1.0)
    after = (kernel_kb() - before) // 1024
    assert pinned < 64, (
        f"{threads} threads pinned {pinned} MiB of kernel memory ({after} MiB a second "
        f"after the session closed): {result}"
    )
