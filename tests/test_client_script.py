"""scripts/client.py against the real server on loopback: the client runs as a
subprocess (``python -m scripts.client``) while the server runs on the test's loop."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import REPO, SCALE, MakeServer, character_source, free_port, write_directory
from fake_openai import (
    FakeOpenAI,
    failure,
    fake_openai_fixture,  # noqa: F401
    text,
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def url_of(server: TestClient) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime?model=t"


async def run_client(url: str, *args: str, stdin: bytes | None = None,
                     wait: float = 20.0) -> Run:
    """Run the client with ``--timeout wait`` to its end (killed if it outlives twice
    that and some)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scripts.client", "--url", url,
        "--timeout", str(wait * SCALE), *args,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin),
                                                2 * wait * SCALE + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def test_list_prints_the_bundled_characters(server: TestClient) -> None:
    run = await run_client(url_of(server), "list")

    assert run.returncode == 0, run
    assert "Bramble" in run.stdout
    assert "Captain Tuesday  no" in run.stdout  # name, good, comment on one line
    assert "Experimental and unfinished" in run.stdout


async def test_say_prints_the_streamed_reply(server: TestClient) -> None:
    run = await run_client(url_of(server), "say", "hello there", "--voice", "Bramble")

    assert run.returncode == 0, run
    assert "hello there" in run.stdout
    assert "talking to Bramble" in run.stderr
    assert run.stdout.count("\n") == 1  # the reply alone, one line


async def test_say_streams_the_models_pieces(
    fake_openai: FakeOpenAI, make_server: MakeServer
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(text("Ahoy", ", friend", "!"))

    run = await run_client(url_of(server), "say", "hi")

    assert (run.returncode, run.stdout) == (0, "Ahoy, friend!\n"), run


async def test_say_loads_a_directory_and_selects_from_it(
    server: TestClient, allowed_root: Path
) -> None:
    directory = write_directory(allowed_root, "pirates", {
        "pip.py": character_source("Pip"), "broken.py": "raise ValueError('nope')\n"})

    run = await run_client(url_of(server), "say", "ahoy", "--directory", str(directory),
                           "--voice", "Pip")

    assert run.returncode == 0, run
    assert "loaded 1 of 2 files" in run.stderr
    assert "broken.py" in run.stderr
    assert "talking to Pip" in run.stderr
    assert "ahoy" in run.stdout


async def test_say_an_unknown_voice_is_an_error(server: TestClient) -> None:
    run = await run_client(url_of(server), "say", "hi", "--voice", "Nobody")

    assert run.returncode == 1, run
    assert "character_not_found" in run.stderr
    assert run.stdout == ""


async def test_say_reports_a_failed_reply(
    fake_openai: FakeOpenAI, make_server: MakeServer
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(failure(400, "the model refused"))

    run = await run_client(url_of(server), "say", "hi")

    assert run.returncode == 1, run
    assert "error: backend_unavailable:" in run.stderr
    assert "'failed'" in run.stderr  # the response.done status


async def test_reload_prints_loaded_errors_and_duration(
    server: TestClient, allowed_root: Path
) -> None:
    directory = write_directory(allowed_root, "mixed", {
        "ada.py": character_source("Ada"), "broken.py": "raise ValueError('nope')\n"})

    run = await run_client(url_of(server), "reload", str(directory))

    assert run.returncode == 0, run
    assert f"loaded 1 of 2 files from {directory.resolve()}, 1 error, in " in run.stdout
    assert " ms\n" in run.stdout
    assert "Ada" in run.stdout
    assert "error in broken.py" in run.stdout


async def test_reload_outside_the_allowed_roots_is_refused(
    server: TestClient, tmp_path: Path
) -> None:
    outside = write_directory(tmp_path, "elsewhere", {"ada.py": character_source("Ada")})

    run = await run_client(url_of(server), "reload", str(outside))

    assert run.returncode == 1, run
    assert "error: directory_not_allowed:" in run.stderr
    assert run.stdout == ""


async def test_chat_runs_commands_and_turns_until_quit(server: TestClient) -> None:
    lines = b"/list\nhi\n/voice Wren\n/bogus\n/quit\nnever sent\n"

    run = await run_client(url_of(server), "chat", stdin=lines)

    assert run.returncode == 0, run
    assert "Bramble" in run.stdout  # /list
    assert "I heard: hi." in run.stdout
    assert "talking to Wren" in run.stdout
    assert "unknown command /bogus" in run.stderr
    assert "never sent" not in run.stdout


async def test_chat_ends_at_the_end_of_input_and_keeps_going_after_errors(
    server: TestClient, tmp_path: Path
) -> None:
    lines = f"/reload {tmp_path}\n/voice Nobody\nstill here\n".encode()

    run = await run_client(url_of(server), "chat", "--voice", "Wren", stdin=lines)

    assert run.returncode == 0, run
    assert "directory_not_allowed" in run.stderr
    assert "character_not_found" in run.stderr
    assert "Wren: " in run.stdout
    assert "I heard: still here." in run.stdout


async def test_connection_refused_says_how_to_start_the_server() -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/realtime?model=t"

    run = await run_client(url, "list")

    assert run.returncode == 1, run
    assert "connection refused" in run.stderr
    assert "make run" in run.stderr


async def test_a_silent_server_times_out(aiohttp_server: Any) -> None:
    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", silent)
    silent_server = await aiohttp_server(app)

    run = await run_client(f"ws://127.0.0.1:{silent_server.port}/v1/realtime?model=t",
                           "list", wait=0.5)

    assert run.returncode == 1, run
    assert "no session.created from the server within" in run.stderr


async def test_a_full_server_closing_the_connection_is_reported(
    make_server: MakeServer
) -> None:
    server = await make_server(max_sessions=0)

    run = await run_client(url_of(server), "list")

    assert run.returncode == 1, run
    assert "closed the connection (code 1013): server full" in run.stderr


async def test_help_says_audio_is_not_supported() -> None:
    run = await run_client("ws://127.0.0.1:9/v1/realtime?model=t", "--help")

    assert run.returncode == 0, run
    assert "Audio is not supported yet" in run.stdout
    for command in ("list", "reload", "say", "chat"):
        assert command in run.stdout


async def test_a_url_without_model_is_refused() -> None:
    run = await run_client("ws://127.0.0.1:9/v1/realtime", "list")

    assert run.returncode == 2, run
    assert "needs a ?model= parameter" in run.stderr
