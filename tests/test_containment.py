"""Red team: character files written by an attacker, and proof from outside that each
attack failed while the server and a bystander session carried on.

Each attack runs at import in a character file, records what it saw in ``RESULT``
(returned to the test in the character's ``comment``), and the test then checks the
world outside the sandbox: files, processes, the server's liveness, the bystander.
The outcomes the attacker reports are never the only evidence.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient
from conftest import REPO, SCALE, Connect, MakeServer, Realtime, write_directory

from server.app import POOL, SESSIONS

SECRET = "troupe-containment-canary-7d41e0"
"""Held in this process's memory and in files the attacker must not read."""


def attack_source(name: str, body: str) -> str:
    """A valid character whose import runs ``body`` (which fills ``RESULT``) first;
    every exception of the attack is recorded, never raised."""
    return (
        "import json, os\nRESULT = {}\n"
        "def attempt(key, action):\n"
        "    try:\n"
        "        RESULT[key] = 'succeeded: ' + repr(action())[:300]\n"
        "    except BaseException as exc:\n"
        "        RESULT[key] = 'failed: ' + type(exc).__name__\n"
        + textwrap.dedent(body)
        + textwrap.dedent(f"""
        CHARACTER_NAME = {name!r}
        VOICE_SOURCE = {{"source_type": "file", "path_on_server": "voices/x.wav"}}
        INSTRUCTIONS = {{"text": "hi"}}
        METADATA = {{"good": True, "comment": json.dumps(RESULT)}}

        class PromptGenerator:
            def __init__(self, instructions):
                self.instructions = instructions

            def make_system_prompt(self):
                return "hi"
        """)
    )


async def run_attack(session: Realtime, root: Path, name: str, body: str) -> dict[str, str]:
    directory = write_directory(root, name.lower(), {"attack.py": attack_source(name, body)})
    reloaded = await session.reload(directory)
    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert reloaded["errors"] == [], reloaded["errors"]
    result: dict[str, str] = json.loads(reloaded["characters"][0]["comment"])
    return result


def failed(result: dict[str, str]) -> dict[str, str]:
    """The attempts that did not fail (empty when every one was refused)."""
    return {key: outcome for key, outcome in result.items() if not outcome.startswith("failed")}


async def bystander_is_fine(session: Realtime) -> None:
    names = await session.names()
    assert "Bramble" in names or names, names


def sandbox_pid(server: TestClient, session_index: int = 0) -> int:
    session = list(server.app[SESSIONS].values())[session_index]
    pid = session.characters.sandbox.pid
    assert pid is not None
    return int(pid)


def descendants(root: int) -> set[int]:
    """Live processes below ``root`` (through ppid links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


async def strays(pool: Any) -> set[int]:
    """Processes below the zygote that are not sandboxes of the pool, once children
    being started or reaped have settled (bounded wait)."""
    for _ in range(int(100 * SCALE)):
        extra = descendants(pool.zygote_pid) - set(pool.live_pids)
        if not extra:
            break
        await asyncio.sleep(0.05)
    return extra


def text_of(path: Path | str) -> str:
    return Path(path).read_text(errors="replace")


def mode_of(path: Path) -> int:
    return path.stat().st_mode


def names_in(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def exists(path: Path | str) -> bool:
    return Path(path).exists()


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A secret file outside every allowed root, owned by the server's user."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


async def test_no_door_into_the_zygote(
    server: TestClient, connect: Connect, allowed_root: Path
) -> None:
    """The old escape: reach whatever forks children and have it run our code. The
    zygote listens nowhere; a child holds no fd but its own channel."""
    attacker, bystander = await connect(), await connect()
    zygote = server.app[POOL].zygote_pid
    assert zygote is not None

    result = await run_attack(attacker, allowed_root, "Knocker", f"""
        import multiprocessing.forkserver, socket, stat
        open_fds = []
        for fd in range(1024):
            try:
                os.fstat(fd)
                open_fds.append(fd)
            except OSError:
                pass
        RESULT["open_fds"] = "failed: " + json.dumps(open_fds)
        attempt("zygote fds", lambda: os.listdir("/proc/{zygote}/fd"))
        attempt("zygote socket", lambda: open("/proc/{zygote}/fd/3", "rb"))
        attempt("stock_forkserver", lambda: multiprocessing.forkserver._forkserver
                ._forkserver_address or _raise())
        def _raise():
            raise LookupError("no address")
        attempt("unix_socket", lambda: socket.socket(socket.AF_UNIX))
        attempt("socketpair", lambda: socket.socketpair())
        """)

    open_fds = json.loads(result.pop("open_fds").removeprefix("failed: "))
    assert open_fds[:3] == [0, 1, 2] and len(open_fds) == 4, open_fds  # std + channel only
    assert failed(result) == {}
    assert await strays(server.app[POOL]) == set()
    await bystander_is_fine(bystander)


async def test_unix_sockets_of_the_host_are_out_of_reach(
    connect: Connect, allowed_root: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "host.sock")
    abstract = f"\0troupe-test-{os.getpid()}"
    connected: list[str] = []

    async def note(name: str) -> Any:
        async def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connected.append(name)
            writer.close()
        return accepted

    listeners = [await asyncio.start_unix_server(await note("path"), path),
                 await asyncio.start_unix_server(await note("abstract"), abstract)]
    attacker = await connect()

    result = await run_attack(attacker, allowed_root, "Dialer", f"""
        import socket
        def dial(address, kind):
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.connect(address)
            return "connected"
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
            attempt(f"path_{{kind}}", lambda: dial({path!r}, kind))
            attempt(f"abstract_{{kind}}", lambda: dial({abstract!r}, kind))
        attempt("tcp", lambda: socket.create_connection(("127.0.0.1", 80), timeout=1))
        """)

    await asyncio.sleep(0.1)
    for listener in listeners:
        listener.close()
    assert failed(result) == {}
    assert connected == []


async def test_no_signal_reaches_the_server_or_another_sandbox(
    server: TestClient, connect: Connect, allowed_root: Path
) -> None:
    bystander, attacker = await connect(), await connect()
    await bystander.names()
    victim = sandbox_pid(server, 0)
    zygote = server.app[POOL].zygote_pid

    result = await run_attack(attacker, allowed_root, "Assassin", f"""
        import signal
        for target in ({os.getpid()}, {victim}, {zygote}, os.getppid()):
            for number in (signal.SIGSTOP, signal.SIGKILL):
                attempt(f"kill_{{target}}_{{number}}", lambda: os.kill(target, number) or _hit())
                attempt(f"killpg_{{target}}", lambda: os.killpg(target, number) or _hit())
        def _hit():
            raise AssertionError("kill returned")
        attempt("everyone", lambda: os.kill(-1, signal.SIGKILL) or _hit())
        attempt("renice_server", lambda: os.setpriority(os.PRIO_PROCESS, {os.getpid()}, 19))
        attempt("pin_server", lambda: os.sched_setaffinity({os.getpid()}, {{0}}))
        attempt("pidfd", lambda: os.pidfd_open({os.getpid()}))
        """)

    # kill() of a pid outside its namespace is ESRCH: no such process, as far as it sees.
    assert failed(result) == {}
    assert os.getpriority(os.PRIO_PROCESS, 0) != 19
    assert len(os.sched_getaffinity(0)) == os.cpu_count()
    assert victim in descendants(zygote or 0)
    assert text_of(f"/proc/{victim}/stat").rpartition(")")[2].split()[0] != "T"  # not stopped
    await bystander_is_fine(bystander)
    assert await attacker.names() == ["Assassin"]


async def test_the_server_cannot_be_killed(
    server_process: Callable[..., Awaitable[str]], allowed_root: Path
) -> None:
    """The server as its own process: the attack names its pid, its parent's and -1."""
    url = await server_process()
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(f"{url}/v1/health")).json()
        server_pid = health["pid"]
        ws = await http.ws_connect(f"{url}/v1/realtime?model=x", protocols=("realtime",))
        attacker = Realtime(ws)
        await attacker.receive()
        result = await run_attack(attacker, allowed_root, "Regicide", f"""
            import signal
            attempt("kill", lambda: os.kill({server_pid}, signal.SIGKILL))
            attempt("stop", lambda: os.kill({server_pid}, signal.SIGSTOP))
            attempt("parent", lambda: os.kill(os.getppid(), signal.SIGKILL) if os.getppid()
                    else _none())
            def _none():
                raise ProcessLookupError("no parent in sight")
            attempt("all", lambda: os.kill(-1, signal.SIGKILL))
            """)
        await ws.close()
        assert failed(result) == {}
        async with http.get(f"{url}/v1/health") as response:
            assert response.status == 200


async def test_nothing_outside_its_directory_is_readable(
    server: TestClient, connect: Connect, allowed_root: Path, canary: Path
) -> None:
    attacker = await connect()
    zygote = server.app[POOL].zygote_pid

    result = await run_attack(attacker, allowed_root, "Reader", f"""
        import glob
        def read(path):
            with open(path, "rb") as source:
                return source.read(4096)
        for path in ["/etc/shadow", "/etc/passwd", "/root/.bashrc", {str(canary)!r},
                     "/proc/{os.getpid()}/cmdline", "/proc/{os.getpid()}/environ",
                     "/proc/{os.getpid()}/mem", "/proc/{zygote}/environ",
                     "/proc/self/environ", {str(REPO / "server" / "app.py")!r},
                     {str(REPO / "setup.cfg")!r}]:
            attempt("read " + path, lambda: read(path))
        for path in ["/", "/root", "/tmp", "/proc", {str(REPO)!r}, {str(canary.parent)!r}]:
            attempt("list " + path, lambda: os.listdir(path))
        attempt("escape by ..", lambda: read(os.path.join(os.path.dirname(__file__),
                "..", "..", "outside", "secret.txt")))
        """)

    assert failed(result) == {}
    assert SECRET not in json.dumps(result)


async def test_memory_of_other_processes_is_out_of_reach(
    server: TestClient, connect: Connect, allowed_root: Path
) -> None:
    attacker = await connect()
    address = id(SECRET)

    result = await run_attack(attacker, allowed_root, "Peeker", f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        def vm_read():
            buffer = ctypes.create_string_buffer(256)
            local, remote = IoVec(ctypes.addressof(buffer), 256), IoVec({address}, 256)
            count = libc.process_vm_readv({os.getpid()}, ctypes.byref(local), 1,
                                          ctypes.byref(remote), 1, 0)
            if count < 0:
                raise OSError(ctypes.get_errno(), "process_vm_readv")
            return buffer.raw
        attempt("process_vm_readv", vm_read)
        def ptrace():
            if libc.ptrace(16, {os.getpid()}, 0, 0) != 0:  # PTRACE_ATTACH
                raise OSError(ctypes.get_errno(), "ptrace")
        attempt("ptrace", ptrace)
        def mem():
            with open("/proc/{os.getpid()}/mem", "rb") as memory:
                memory.seek({address})
                return memory.read(256)
        attempt("proc_mem", mem)
        def uring():
            params = ctypes.create_string_buffer(120)
            fd = libc.syscall(425, 8, params)  # io_uring_setup
            if fd < 0:
                raise OSError(ctypes.get_errno(), "io_uring_setup")
            return fd
        attempt("io_uring", uring)
        """)

    assert failed(result) == {}
    assert SECRET not in json.dumps(result)


async def test_nothing_is_writable(
    server: TestClient, connect: Connect, allowed_root: Path, canary: Path, tmp_path: Path
) -> None:
    attacker = await connect()
    own = allowed_root / "writer"
    own.mkdir()
    (own / "link").symlink_to(canary)
    bundled = REPO / "characters"
    before_bundled = names_in(bundled)
    canary_mode = mode_of(canary)

    result = await run_attack(attacker, allowed_root, "Writer", f"""
        def write(path, data=b"x"):
            with open(path, "wb") as target:
                target.write(data)
        here = os.path.dirname(__file__)
        for path in ["/tmp/troupe-attack-{os.getpid()}", os.path.join(here, "planted.py"),
                     {str(bundled / "planted.py")!r}, {str(canary)!r},
                     os.path.join(here, "link"), "/etc/troupe-attack",
                     {str(tmp_path / "planted")!r}]:
            attempt("write " + path, lambda: write(path))
        attempt("append canary", lambda: open({str(canary)!r}, "ab").write(b"!"))
        attempt("chmod canary", lambda: os.chmod({str(canary)!r}, 0o777))
        attempt("chmod through link", lambda: os.chmod(os.path.join(here, "link"), 0o777))
        attempt("truncate canary", lambda: os.truncate({str(canary)!r}, 0))
        attempt("remove canary", lambda: os.remove({str(canary)!r}))
        attempt("rename own file", lambda: os.rename(__file__, __file__ + ".bak"))
        attempt("mkdir", lambda: os.mkdir(os.path.join(here, "sub")))
        attempt("mkfifo", lambda: os.mkfifo(os.path.join(here, "fifo")))
        attempt("hard link", lambda: os.link({str(canary)!r}, os.path.join(here, "hard")))
        attempt("utime", lambda: os.utime({str(canary)!r}, (0, 0)))
        attempt("shared memory", lambda: os.open("/dev/shm/troupe-attack",
                                                  os.O_CREAT | os.O_WRONLY))
        attempt("many files", lambda: [write(f"/tmp/troupe-fill-{{i}}", bytes(1 << 20))
                                       for i in range(300)])
        """)

    assert failed(result) == {}
    assert text_of(canary) == SECRET
    assert mode_of(canary) == canary_mode
    assert names_in(own) == ["attack.py", "link"]
    assert names_in(bundled) == before_bundled
    assert not exists(f"/tmp/troupe-attack-{os.getpid()}")
    assert not exists("/tmp/troupe-fill-0")
    assert not exists(tmp_path / "planted")
    assert not exists("/dev/shm/troupe-attack")


async def test_no_process_escapes_or_multiplies(
    server: TestClient, connect: Connect, allowed_root: Path
) -> None:
    attacker, bystander = await connect(), await connect()
    pool = server.app[POOL]
    zygote = pool.zygote_pid
    assert zygote is not None

    result = await run_attack(attacker, allowed_root, "Breeder", """
        import subprocess, threading
        def daemonize():
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    import time
                    time.sleep(600)
                os._exit(0)
        attempt("double fork", daemonize)
        attempt("fork 200", lambda: [os.fork() for _ in range(200)])
        attempt("subprocess", lambda: subprocess.Popen(["sleep", "600"]))
        attempt("posix_spawn", lambda: os.posix_spawn("/bin/sleep", ["sleep", "600"], {}))
        attempt("exec", lambda: os.execv("/bin/sleep", ["sleep", "600"]))
        """)

    assert failed(result) == {}
    assert await strays(pool) == set()  # everything below the zygote is a known sandbox
    await attacker.ws.close()
    assert await strays(pool) == set()
    await bystander_is_fine(bystander)


async def test_a_loop_left_burning_cpu_is_stopped_and_the_session_told(
    make_server: MakeServer, connect_to: Any, allowed_root: Path, config: Any
) -> None:
    sandbox = msgspec.structs.replace(config.sandbox, idle_check_interval=0.5,
                                      idle_cpu_seconds=0.2)
    server = await make_server(sandbox=sandbox)
    attacker = await connect_to(server)
    await attacker.names()

    result = await run_attack(attacker, allowed_root, "Burner", """
        import signal, threading
        def burn():
            while True:
                pass
        attempt("thread", lambda: threading.Thread(target=burn, daemon=True).start())
        def spin(*_):
            while True:
                pass
        signal.signal(signal.SIGALRM, spin)  # runs while the child waits for requests
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        """)
    assert result["thread"].startswith("failed")  # no threads in a sandbox
    burner = sandbox_pid(server)

    told = await attacker.receive(within=30)  # unasked: the session is told at once
    assert told["type"] == "error", told
    assert told["error"]["code"] == "sandbox_crashed"
    assert "CPU" in told["error"]["message"]
    for _ in range(int(100 * SCALE)):
        if burner not in descendants(server.app[POOL].zygote_pid or 0):
            break
        await asyncio.sleep(0.05)
    assert burner not in descendants(server.app[POOL].zygote_pid or 0)
    assert await attacker.names() == ["Burner"]  # restarted on the same directory
    assert sandbox_pid(server) != burner


async def test_children_see_only_the_scrubbed_environment_even_after_a_zygote_restart(
    server: TestClient, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TROUPE_TEST_SECRET", SECRET)
    pool = server.app[POOL]
    first = pool.zygote_pid
    assert first is not None
    assert SECRET not in text_of(f"/proc/{first}/environ")
    os.kill(first, signal.SIGKILL)
    for _ in range(int(100 * SCALE)):  # the server notices, and kills its children
        if pool.zygote_pid != first:
            break
        await asyncio.sleep(0.05)
    session = await connect()

    for _ in range(int(100 * SCALE)):  # the next spawn starts a new zygote
        if pool.zygote_pid not in (None, first):
            break
        await session.names()
        await asyncio.sleep(0.05)
    second = pool.zygote_pid
    assert second not in (None, first)
    assert SECRET not in text_of(f"/proc/{second}/environ")
    assert SECRET not in text_of(f"/proc/{second}/cmdline")
    assert await session.names()


async def test_health_reports_the_protections_in_force(server: TestClient) -> None:
    health = await (await server.get("/v1/health")).json()

    sandbox = health["sandbox"]
    assert sandbox["missing"] == []
    assert set(sandbox["protections"]) >= {"pid_namespace", "seccomp", "landlock"}



async def test_require_sandbox_starts_when_everything_is_in_force(
    server_process: Callable[..., Awaitable[str]]
) -> None:
    """This kernel has every protection: ``--require-sandbox`` starts and says so."""
    url = await server_process(env={"TROUPE_REQUIRE_SANDBOX": "1"})
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(f"{url}/v1/health")).json()
    assert health["sandbox"]["missing"] == []


def test_require_sandbox_refuses_a_kernel_without_landlock(tmp_path: Path) -> None:
    """Landlock switched off for the server's process tree (a seccomp filter of the
    test's own making answers ENOSYS to landlock_create_ruleset, as an old kernel
    would): the server refuses to start and says what is missing."""
    import subprocess
    import sys
    script = textwrap.dedent("""
        import errno, runpy, sys
        import pyseccomp as seccomp
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "landlock_create_ruleset")
        rules.load()
        sys.argv = ["server", "--port", "0", "--require-sandbox", "--llm", "none",
                    "--stt", "none", "--tts", "none"]
        runpy.run_module("server", run_name="__main__")
        """)
    finished = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                              text=True, timeout=60 * SCALE)
    assert finished.returncode == 1, finished.stderr
    assert "not starting" in finished.stderr
    assert "landlock" in finished.stderr


async def test_system_calls_newer_than_libseccomp_are_refused_too(
    connect: Connect, allowed_root: Path
) -> None:
    """libseccomp 2.5.4 (Debian 12) knows none of these names; a filter built from
    names alone let setxattrat change a server file's ACL (found in review)."""
    attacker = await connect()

    result = await run_attack(attacker, allowed_root, "Newcomer", """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        def call(number):
            if libc.syscall(number, 0, 0, 0, 0, 0, 0) != -1:
                return "returned"
            code = ctypes.get_errno()
            if code != errno.EPERM and code != errno.ENOSYS:
                return errno.errorcode.get(code, code)  # reached the kernel's checks
            raise PermissionError(code, "refused")
        for name, number in [("fchmodat2", 452), ("statmount", 457), ("listmount", 458),
                             ("setxattrat", 463), ("removexattrat", 466),
                             ("open_tree_attr", 467), ("file_setattr", 469),
                             ("future", 480)]:
            attempt(name, lambda: call(number))
        """)

    assert failed(result) == {}
