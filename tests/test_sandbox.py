"""The sandbox on its own: real children, no server."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import SCALE, character_source, write_directory

from sandbox import (
    CallFailed,
    ChildLimits,
    Observer,
    Pool,
    Sandbox,
    SandboxConfig,
    SandboxCrashed,
    SandboxTimeout,
)


class Recorder(Observer):
    def __init__(self) -> None:
        self.outputs: list[str] = []
        self.crashes: list[str] = []

    def output(self, label: str, text: str) -> None:
        self.outputs.append(text)

    def crashed(self, label: str, reason: str) -> None:
        self.crashes.append(reason)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool(
        SandboxConfig(limits=ChildLimits(memory_mb=256), file_timeout=1.0 * SCALE,
                      call_timeout=1.0 * SCALE, pool_size=1),
        Recorder(),
    )
    await pool.start()
    yield pool
    await pool.close()


def prompt_character(name: str, prompt_body: str, top: str = "") -> str:
    """A character whose make_system_prompt runs ``prompt_body`` (returning a str)."""
    source = character_source(name, body=top)
    return source.replace('        return self.instructions["text"]', prompt_body)


async def loaded(pool: Pool, directory: Path) -> Sandbox:
    sandbox = Sandbox(pool, "test")
    await sandbox.start(str(directory))
    return sandbox


async def test_prompt_crash_restarts_on_the_same_directory(pool: Pool, tmp_path: Path) -> None:
    directory = write_directory(tmp_path, "d", {
        "crash.py": prompt_character("Crash", "        import os; os._exit(9)"),
        "fine.py": character_source("Fine", prompt="still here"),
    })
    sandbox = await loaded(pool, directory)
    first_pid = await sandbox.ping()

    with pytest.raises(SandboxCrashed, match="exited with code 9"):
        await sandbox.system_prompt("Crash")

    assert await sandbox.system_prompt("Fine") == "still here"
    assert await sandbox.ping() != first_pid
    await sandbox.close()


async def test_prompt_hang_times_out_and_restarts(pool: Pool, tmp_path: Path) -> None:
    directory = write_directory(tmp_path, "d", {
        "hang.py": prompt_character("Hang", "        while True: pass"),
        "fine.py": character_source("Fine", prompt="still here"),
    })
    sandbox = await loaded(pool, directory)

    with pytest.raises(SandboxTimeout):
        await sandbox.system_prompt("Hang")

    assert await sandbox.system_prompt("Fine") == "still here"
    await sandbox.close()


async def test_character_exception_comes_back_with_its_traceback(
    pool: Pool, tmp_path: Path
) -> None:
    directory = write_directory(tmp_path, "d", {
        "oops.py": prompt_character("Oops", "        raise KeyError('no such mood')"),
    })
    sandbox = await loaded(pool, directory)
    pid = await sandbox.ping()

    with pytest.raises(CallFailed) as failure:
        await sandbox.system_prompt("Oops")

    assert failure.value.error_type == "KeyError"
    assert "oops.py" in failure.value.traceback
    assert await sandbox.ping() == pid  # an exception does not cost the child
    await sandbox.close()


async def test_tools_are_called_in_the_sandbox_and_keep_state(pool: Pool, tmp_path: Path) -> None:
    counter = character_source("Counter") + """
TOOLS = [{"type": "function", "function": {
    "name": "count", "description": "Count one more.",
    "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}}}}]

def _handle(self, name, arguments):
    self.total = getattr(self, "total", 0) + arguments.get("step", 1)
    import os
    return f"{self.total} in {os.getpid()}"

PromptGenerator.handle_tool_call = _handle
"""
    sandbox = await loaded(pool, write_directory(tmp_path, "d", {"counter.py": counter}))

    tools = await sandbox.tools("Counter")
    first = await sandbox.call_tool("Counter", "count", {"step": 2})
    second = await sandbox.call_tool("Counter", "count", {"step": 3})

    assert [tool["function"]["name"] for tool in tools] == ["count"]
    assert first.split() == ["2", "in", "1"]  # pid 1 of the sandbox's own PID namespace
    assert second.startswith("5 in ")
    assert sandbox.pid != os.getpid()
    with pytest.raises(CallFailed, match="no tool named"):
        await sandbox.call_tool("Counter", "format_disk", {})
    await sandbox.close()


async def test_child_is_contained(pool: Pool, tmp_path: Path) -> None:
    report = prompt_character("Inspector", """
        import json, os, resource, sys
        def _is_open(fd):
            try:
                return os.fstat(fd) is not None
            except OSError:
                return False
        return json.dumps({
            "own_group": os.getpgid(0) == os.getpid(),
            "memory_limit": resource.getrlimit(resource.RLIMIT_AS)[0],
            "open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "file_size": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
            "stdin_is_null": os.fstat(0).st_rdev == os.stat("/dev/null").st_rdev,
            "environment": sorted(os.environ),
            "fds": [fd for fd in range(256) if _is_open(fd)],
        })""")
    sandbox = await loaded(pool, write_directory(tmp_path, "d", {"i.py": report}))

    seen = json.loads(await sandbox.system_prompt("Inspector"))

    assert seen["own_group"] is True
    assert seen["memory_limit"] == 256 * 1024 * 1024
    assert seen["open_files"] == 64
    assert seen["file_size"] == 1024 * 1024
    assert seen["stdin_is_null"] is True
    assert set(seen["environment"]) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
                                        "TROUPE_LLM_NAME", "OPENBLAS_NUM_THREADS",
                                        "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    assert len(seen["fds"]) == 4  # stdin, stdout, stderr and the channel: nothing else
    await sandbox.close()


async def test_output_is_captured_and_reported(pool: Pool, tmp_path: Path) -> None:
    chatty = character_source("Chatty", body="print('hello from import')\n")
    sandbox = await loaded(pool, write_directory(tmp_path, "d", {"c.py": chatty}))

    assert isinstance(pool.observer, Recorder)
    assert any("hello from import" in text for text in pool.observer.outputs)
    await sandbox.close()


async def test_closing_kills_and_reaps_the_child(pool: Pool, tmp_path: Path) -> None:
    sandbox = await loaded(pool, write_directory(tmp_path, "d", {"a.py": character_source("A")}))
    pid = await sandbox.ping()

    await sandbox.close()

    assert str(pid) not in os.listdir("/proc")
    assert pid not in pool.live_pids


async def test_a_cancelled_call_leaves_no_reply_for_the_next_caller(
    pool: Pool, tmp_path: Path
) -> None:
    """A barge-in cancels the reply that was fetching a prompt: the late answer must be
    dropped, and the healthy child kept."""
    slow = prompt_character("Slow", "        import time; time.sleep(0.3); return 'slow'")
    directory = write_directory(tmp_path, "d", {
        "slow.py": slow, "quick.py": character_source("Quick", prompt="quick"),
    })
    sandbox = await loaded(pool, directory)
    pid = await sandbox.ping()

    for _ in range(5):
        asking = asyncio.create_task(sandbox.system_prompt("Slow"))
        await asyncio.sleep(0.05)
        asking.cancel()
        assert await sandbox.system_prompt("Quick") == "quick"
        assert sorted(c.name for c in await sandbox.list()) == ["Quick", "Slow"]

    assert await sandbox.ping() == pid  # never restarted
    assert isinstance(pool.observer, Recorder)
    assert pool.observer.crashes == []
    await sandbox.close()


WIRE_ATTACKS = {
    "wrong_id": "wire.write_frame(fd, wire.Pong(id=10_000, pid=1))",
    "wrong_type": "wire.write_frame(fd, wire.Tools(id=self_id(), tools=[]))",
    "not_a_frame": "os.write(fd, struct.pack('!I', 5) + b'\\xc1\\xc1\\xc1\\xc1\\xc1')",
    "gigabytes": "os.write(fd, struct.pack('!I', 4_000_000_000))",
}


@pytest.mark.parametrize("attack", sorted(WIRE_ATTACKS))
async def test_a_child_that_breaks_the_protocol_is_replaced(
    pool: Pool, tmp_path: Path, attack: str
) -> None:
    """Character code writes to its own channel: whatever it sends, the host kills the
    child, restarts it on the same directory and reports a typed error."""
    forger = prompt_character("Forger", f"""
        import os, socket, stat, struct
        from sandbox import wire
        fd = next(fd for fd in range(3, 256) if _socket(fd))
        def self_id():  # the id of the request being served, read off the stack
            import sys
            frame = sys._getframe()
            while frame.f_code.co_name != "serve":
                frame = frame.f_back
            return frame.f_locals["request"].id
        {WIRE_ATTACKS[attack]}
        import time; time.sleep(0.2)
        return "forged" """, top="""
import os, stat
def _socket(fd):
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
""")
    directory = write_directory(tmp_path, "d", {
        "forger.py": forger, "honest.py": character_source("Honest", prompt="honest"),
    })
    sandbox = await loaded(pool, directory)
    first = await sandbox.ping()

    with pytest.raises(SandboxCrashed, match="protocol|answered|never asked"):
        await sandbox.system_prompt("Forger")

    assert await sandbox.system_prompt("Honest") == "honest"
    assert await sandbox.ping() != first
    assert str(first) not in os.listdir("/proc")
    await sandbox.close()


async def wait_warm(pool: Pool, directory: Path) -> None:
    for _ in range(int(200 * SCALE)):
        if str(directory) in pool.warm_directories:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{directory} was never kept warm: {pool.warm_directories}")


async def test_a_directory_loaded_again_is_handed_over_warm(pool: Pool, tmp_path: Path) -> None:
    directory = write_directory(tmp_path, "d", {"a.py": character_source("A", prompt="one")})
    await (await loaded(pool, directory)).close()  # a first load makes it worth keeping
    await wait_warm(pool, directory)
    kept = pool._warm[str(directory)][0].pid

    sandbox = await loaded(pool, directory)

    assert sandbox.pid == kept  # handed over: no load on the critical path
    assert await sandbox.system_prompt("A") == "one"
    await wait_warm(pool, directory)  # and warmed again for the load after
    assert pool._warm[str(directory)][0].pid != kept
    await sandbox.close()


async def test_a_load_waits_for_its_directory_warm_load_already_running(
    tmp_path: Path
) -> None:
    """With no idle child, the warm load is further along than a load started now
    (after a spawn) would be: the session gets that child, not a second load."""
    pool = Pool(SandboxConfig(file_timeout=2.0 * SCALE, pool_size=0))
    await pool.start()
    try:
        await _waits_for_the_warm_load(pool, tmp_path)
    finally:
        await pool.close()


async def _waits_for_the_warm_load(pool: Pool, tmp_path: Path) -> None:
    slow = character_source("Slow", body="import time\ntime.sleep(0.3)\n", prompt="slow")
    directory = write_directory(tmp_path, "d", {"slow.py": slow})
    first = await loaded(pool, directory)
    for _ in range(int(200 * SCALE)):  # until the warm load runs in a child of its own
        preload = pool._preloads.get(str(directory))
        loading = set(pool.live_pids) - {child.pid for child in pool._idle} - {first.pid}
        if preload is not None and preload.started and loading:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the warm load never started")

    second = await loaded(pool, directory)

    assert loading == {second.pid}
    assert await second.system_prompt("Slow") == "slow"
    await first.close()
    await second.close()


async def test_loads_spread_over_more_directories_than_places_keep_the_warm_one(
    tmp_path: Path
) -> None:
    """One place: a directory loaded once does not evict the kept one (it would be
    evicted in turn before anyone used it); loaded twice since, it takes the place."""
    pool = Pool(SandboxConfig(pool_size=1, warm_directories=1))
    await pool.start()
    try:
        kept, other = (write_directory(tmp_path, name, {"a.py": character_source(name)})
                       for name in ("Kept", "Other"))
        await (await loaded(pool, kept)).close()
        await wait_warm(pool, kept)

        await (await loaded(pool, other)).close()
        await asyncio.sleep(0.3 * SCALE)  # time enough for a warm load it must not start
        assert pool.warm_directories == [str(kept)]

        await (await loaded(pool, other)).close()
        await wait_warm(pool, other)
        assert pool.warm_directories == [str(other)]
    finally:
        await pool.close()


async def test_a_changed_file_is_never_served_from_a_warm_child(
    pool: Pool, tmp_path: Path
) -> None:
    directory = write_directory(tmp_path, "d", {"a.py": character_source("A", prompt="one")})
    await (await loaded(pool, directory)).close()
    await wait_warm(pool, directory)
    kept = pool._warm[str(directory)][0].pid

    write_directory(tmp_path, "d", {"a.py": character_source("A", prompt="two, longer")})
    sandbox = await loaded(pool, directory)

    assert sandbox.pid != kept
    assert await sandbox.system_prompt("A") == "two, longer"
    await sandbox.close()


async def test_the_cpu_watchdog_charges_idling_not_work(tmp_path: Path) -> None:
    """A long request, even one whose caller went away, is work; a loop that goes on
    after the answer is not."""
    pool = Pool(SandboxConfig(call_timeout=5.0 * SCALE, pool_size=0, idle_check_interval=0.2,
                              idle_cpu_seconds=0.1), Recorder())
    await pool.start()
    worker = prompt_character("Worker", """
        import time
        end = time.process_time() + 0.8
        while time.process_time() < end:
            pass
        return "done" """)
    idler = prompt_character("Idler", """
        import signal
        def spin(*_):
            while True:
                pass
        signal.signal(signal.SIGALRM, spin)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return "idling" """)
    sandbox = await loaded(pool, write_directory(tmp_path, "d", {"w.py": worker, "i.py": idler}))
    pid = await sandbox.ping()
    try:
        assert await sandbox.system_prompt("Worker") == "done"
        abandoned = asyncio.create_task(sandbox.system_prompt("Worker"))
        await asyncio.sleep(0.1)
        abandoned.cancel()
        await asyncio.sleep(1.2)  # the child finishes the abandoned request
        assert await sandbox.ping() == pid  # work is not idling: never killed

        died: list[str] = []
        sandbox.on_idle_death = died.append
        assert await sandbox.system_prompt("Idler") == "idling"
        for _ in range(int(100 * SCALE)):
            if died:
                break
            await asyncio.sleep(0.05)
        assert died and "CPU" in died[0]
        assert await sandbox.ping() != pid  # restarted on the same directory
    finally:
        await sandbox.close()
        await pool.close()
