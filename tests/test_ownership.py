"""What a backend starts, its owner stops: threads end with the app, tasks start with
``open`` (never in a constructor).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.backends.embedded.inference import SpeechThreads
from server.backends.kyutai.stt import KyutaiSTT
from server.config import Config
from tests.fakes.kyutai_stt import FakeKyutaiSTT


def speech_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate()
            if thread.name.startswith("speech")]


async def test_speech_threads_end_when_closed() -> None:
    threads = SpeechThreads(2)
    names = await asyncio.gather(*(threads.run(lambda: threading.current_thread().name)
                                   for _ in range(4)))
    assert all(name.startswith("speech") for name in names)
    assert speech_threads()

    await threads.close()

    assert speech_threads() == []


async def test_the_embedded_speech_threads_end_with_the_app(config: Config) -> None:
    """The embedded TTS loads piper on its threads at start-up; the app's clean-up
    stops them (they used to live as long as the process)."""
    app = create_app(replace(config, tts="embedded"))
    async with TestClient(TestServer(app)) as client:
        health = await (await client.get("/v1/health")).json()
        assert health["tts_up"], health
        assert speech_threads()

    assert speech_threads() == []


async def test_a_kyutai_stream_reads_only_once_opened(fake_kyutai_stt: FakeKyutaiSTT) -> None:
    """``open`` starts the stream's reader; closing it ends the reader, and no task
    of the stream outlives it."""
    before = asyncio.all_tasks()
    async with KyutaiSTT(fake_kyutai_stt.url) as stt:
        stream = await stt.open()
        readers = [task for task in asyncio.all_tasks() - before
                   if task.get_name().startswith("kyutai-stt reader")]
        assert len(readers) == 1
        await stream.close()
        assert readers[0].done()
    assert {task for task in asyncio.all_tasks() - before if not task.done()} == set()
