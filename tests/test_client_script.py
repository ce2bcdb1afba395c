"""scripts/client.py against the real server on loopback: the client runs as a
subprocess (``python -m scripts.client``) while the server runs on the test's loop."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import REPO, SCALE, MakeServer, character_source, free_port, write_directory

from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS, tone
from tests.fakes.openai_chat import FakeOpenAI, failure, text

NOWHERE = "ws://127.0.0.1:9/v1/realtime?model=t"
"""A URL nothing listens on: a run that stops before connecting never notices."""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def url_of(server: TestClient) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime?model=t"


async def run_client(url: str, *args: str, stdin: bytes | None = None,
                     wait: float = 20.0, env: dict[str, str] | None = None) -> Run:
    """Run the client with ``--timeout wait`` to its end (killed if it outlives twice
    that and some)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scripts.client", "--url", url,
        "--timeout", str(wait * SCALE), *args,
        cwd=REPO, env={**os.environ, **(env or {})},
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


async def test_a_full_server_refusing_the_connection_is_reported(
    make_server: MakeServer
) -> None:
    server = await make_server(max_sessions=0)

    run = await run_client(url_of(server), "list")

    assert run.returncode == 1, run
    assert "refused: server full (HTTP 503); retry in 5 s" in run.stderr


async def test_a_key_from_the_environment_opens_a_keyed_server(
    make_server: MakeServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "cli"\nsecret = "sk-cli-0123456789abcdef"\n')
    server = await make_server(api_keys=keys)

    without = await run_client(url_of(server), "list")
    wrong = await run_client(url_of(server), "list", env={"TROUPE_API_KEY": "sk-wrong-000000000"})
    right = await run_client(url_of(server), "list",
                             env={"TROUPE_API_KEY": "sk-cli-0123456789abcdef"})

    assert without.returncode == 1 and "needs an API key (HTTP 401)" in without.stderr
    assert "TROUPE_API_KEY" in without.stderr
    assert wrong.returncode == 1 and "refused the key" in wrong.stderr
    assert "sk-wrong" not in wrong.stderr
    assert right.returncode == 0, right
    assert "Bramble" in right.stdout


async def test_help_names_the_commands_and_the_speech_options() -> None:
    run = await run_client(NOWHERE, "--help")
    say = await run_client(NOWHERE, "say", "--help")
    chat = await run_client(NOWHERE, "chat", "--help")

    assert (run.returncode, say.returncode, chat.returncode) == (0, 0, 0), (run, say, chat)
    assert "not supported" not in run.stdout
    for command in ("list", "reload", "say", "chat"):
        assert command in run.stdout
    for option in ("--wav", "--fast", "--save-audio"):
        assert option in say.stdout
    assert "--mic" in chat.stdout


async def test_a_url_without_model_is_refused() -> None:
    run = await run_client("ws://127.0.0.1:9/v1/realtime", "list")

    assert run.returncode == 2, run
    assert "needs a ?model= parameter" in run.stderr


# ── speech ───────────────────────────────────────────────────────────────────


def voice(t: np.ndarray) -> np.ndarray:
    """Speech-like audio at times ``t`` (seconds): a 140 Hz voice with two harmonics,
    its loudness rising and falling four times a second like syllables."""
    syllables = 0.5 + 0.5 * np.sin(2 * math.pi * 4 * t)
    harmonics = sum(weight * np.sin(2 * math.pi * 140 * k * t)
                    for k, weight in ((1, 1.0), (2, 0.5), (3, 0.25)))
    return 0.3 * syllables * harmonics / 1.75


def write_voice(path: Path, seconds: float, rate: int, channels: int) -> Path:
    """A pcm16 WAV of ``voice``; with two channels, one louder than the other (their
    mean is ``voice``)."""
    mono = voice(np.arange(round(seconds * rate)) / rate)
    samples = np.stack([mono * 1.2, mono * 0.8], axis=1) if channels == 2 else mono
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path


def assert_received_voice(stt: FakeKyutaiSTT, seconds: float) -> None:
    """The STT got ``voice`` at 24 kHz for ``seconds``, then only the silence of the
    flush: the client mixed and resampled the file and sent all of it."""
    samples = np.array(stt.connections[-1].samples)
    length = round(seconds * 24_000)
    assert len(samples) > length
    edge = 64  # the resampling filter's reach, where the file starts and stops
    np.testing.assert_allclose(samples[edge:length - edge],
                               voice(np.arange(edge, length - edge) / 24_000), atol=3e-3)
    assert not np.any(samples[length:])


async def test_say_wav_prints_what_was_heard_and_saves_the_spoken_reply(
    fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT,
    fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer, tmp_path: Path,
) -> None:
    server = await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url,
                               tts=fake_kyutai_tts.url)
    fake_kyutai_stt.script(("Ahoy", 0.3), ("captain", 0.7), end=1.1)  # what it "hears"
    fake_openai.script(text("Aye, ", "aye ", "captain!"))
    speech = write_voice(tmp_path / "in.wav", 1.5, rate=44_100, channels=2)
    out = tmp_path / "out.wav"

    run = await run_client(url_of(server), "say", "--wav", str(speech), "--fast",
                           "--save-audio", str(out))

    assert run.returncode == 0, run
    assert run.stdout == "Aye, aye captain!\n"
    assert "heard: Ahoy captain\n" in run.stderr
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user",
                                                        "content": "Ahoy captain"}
    assert_received_voice(fake_kyutai_stt, 1.5)
    info = soundfile.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    saved, _ = soundfile.read(out, dtype="float64")
    per_word = fake_kyutai_tts.samples_per_word
    assert len(saved) == 3 * per_word  # the fake speaks each word for a fixed time
    expected = np.concatenate([tone(i, per_word) for i in range(3)])
    np.testing.assert_allclose(saved, expected, atol=1e-4)
    assert f"to {out}" in run.stderr


async def test_say_wav_at_real_time_resamples_a_low_rate_file(
    fake_kyutai_stt: FakeKyutaiSTT, make_server: MakeServer, tmp_path: Path,
) -> None:
    server = await make_server(stt=fake_kyutai_stt.url)  # the built-in responder
    fake_kyutai_stt.script(("Hi", 0.1), ("there", 0.3), end=0.45)
    speech = write_voice(tmp_path / "in.wav", 0.5, rate=16_000, channels=1)

    run = await run_client(url_of(server), "say", "--wav", str(speech))

    assert run.returncode == 0, run
    assert "I heard: Hi there" in run.stdout
    assert "heard: Hi there\n" in run.stderr
    assert_received_voice(fake_kyutai_stt, 0.5)


async def test_say_wav_without_speech_to_text_says_so(server: TestClient,
                                                       tmp_path: Path) -> None:
    speech = write_voice(tmp_path / "in.wav", 1.0, rate=24_000, channels=1)

    run = await run_client(url_of(server), "say", "--wav", str(speech), "--fast")

    assert run.returncode == 1, run
    assert "error: backend_unavailable: " in run.stderr
    assert "speech-to-text" in run.stderr
    assert "--stt" in run.stderr
    assert run.stdout == ""


async def test_say_wav_that_nobody_speaks_in_asks_for_no_reply(
    fake_kyutai_stt: FakeKyutaiSTT, make_server: MakeServer, tmp_path: Path,
) -> None:
    server = await make_server(stt=fake_kyutai_stt.url)  # nothing scripted: no words
    speech = write_voice(tmp_path / "in.wav", 0.5, rate=24_000, channels=1)

    run = await run_client(url_of(server), "say", "--wav", str(speech), "--fast")

    assert run.returncode == 1, run
    assert "heard: (no words)" in run.stderr
    assert "heard no words in" in run.stderr
    assert run.stdout == ""


async def test_say_wav_of_a_missing_file_stops_before_connecting(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"

    run = await run_client(NOWHERE, "say", "--wav", str(missing))

    assert run.returncode == 2, run
    assert run.stderr == f"error: {missing}: no such file\n"


async def test_say_wav_of_a_file_that_is_not_audio_stops_before_connecting(
    tmp_path: Path
) -> None:
    bogus = tmp_path / "notes.wav"
    bogus.write_text("not a WAV file\n")

    run = await run_client(NOWHERE, "say", "--wav", str(bogus))

    assert run.returncode == 2, run
    assert f"error: cannot read {bogus} as audio" in run.stderr
    assert "Traceback" not in run.stderr


async def test_say_text_saves_the_spoken_reply(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    tmp_path: Path,
) -> None:
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    fake_openai.script(text("Fair ", "winds."))
    out = tmp_path / "reply.wav"

    run = await run_client(url_of(server), "say", "any news?", "--save-audio", str(out))

    assert run.returncode == 0, run
    assert run.stdout == "Fair winds.\n"
    assert soundfile.info(out).frames == 2 * fake_kyutai_tts.samples_per_word


async def test_say_asks_for_speech_only_when_it_saves_it(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
) -> None:
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    fake_openai.script(text("Fair winds."))

    run = await run_client(url_of(server), "say", "any news?")

    assert (run.returncode, run.stdout) == (0, "Fair winds.\n"), run
    assert fake_kyutai_tts.connections == []


async def test_save_audio_without_a_voice_on_the_server_fails_after_the_reply(
    server: TestClient, tmp_path: Path
) -> None:
    out = tmp_path / "reply.wav"

    run = await run_client(url_of(server), "say", "hi", "--save-audio", str(out))

    assert run.returncode == 1, run
    assert "I heard: hi." in run.stdout
    assert "sent no audio for the reply" in run.stderr
    assert "--tts" in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ("say",), ("say", "hi", "--wav", "in.wav"), ("say", "hi", "--fast"),
    ("say", "hi", "--save-audio", "/no/such/directory/out.wav"),
], ids=["nothing", "text-and-wav", "fast-without-wav", "no-directory"])
async def test_say_refuses_a_bad_command_line(args: tuple[str, ...]) -> None:
    run = await run_client(NOWHERE, *args)

    assert run.returncode == 2, run
    assert "error:" in run.stderr
    assert "Traceback" not in run.stderr


async def test_chat_mic_without_portaudio_says_what_to_install() -> None:
    try:
        import sounddevice  # noqa: F401 -- only to learn whether PortAudio is here
    except ImportError:
        missing = "needs the sounddevice package"
    except OSError:  # sounddevice's way of saying it found no PortAudio library
        missing = "needs PortAudio, which is not installed"
    else:
        pytest.skip("PortAudio is installed here; the microphone itself is not tested")

    run = await run_client(NOWHERE, "chat", "--mic")

    assert run.returncode == 2, run
    assert missing in run.stderr
    assert "Traceback" not in run.stderr


async def test_chat_ends_normally_when_the_character_says_goodbye(
    fake_openai: FakeOpenAI, make_server: MakeServer
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(text("Fair winds. Bye!"))

    run = await run_client(url_of(server), "chat", stdin=b"farewell\nstill there?\n")

    assert run.returncode == 0, run
    assert "Fair winds. Bye!" in run.stdout
    assert "the server ended the session: the character said goodbye" in run.stderr
