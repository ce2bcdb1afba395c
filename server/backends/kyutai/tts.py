"""Speech from a Kyutai TTS server: moshi-server's WebSocket ``/api/tts_streaming``.

    KyutaiTTS.speak(text_chunks, voice)
      ws_connect …/api/tts_streaming?format=PcmMessagePack&voice=…&cfg_alpha=…
                 header kyutai-api-key
      ◀── Ready                        Error instead: no free channel → BackendUnavailable
      ──▶ Text{text}                   one whole word per message, as text_chunks arrive
      ──▶ Eos                          once text_chunks is exhausted
      ◀── Text{text, start_s, stop_s}  ──▶ yield SpokenWord
      ◀── Audio{pcm: [f32 …]}          ──▶ yield AudioChunk   (24 kHz mono, 1920 a frame)
      ◀── close                        every word spoken: the generator ends

Every message is one binary frame holding a msgpack map tagged by ``type``
(``tts_wire``; the handshake is ``connection``'s, shared with speech to text). A writer
task sends the words and a reader task decodes the replies; both report to one queue
that ``speak`` drains, so a failure on either side ends the reply at once. Leaving
``speak`` early (a barge-in cancels or closes it) stops both tasks and closes the
socket without waiting for the server.

Every wait on the server is bounded by ``timeout``: connecting, ``Ready``, and each
gap between frames (moshi-server pings every 10 s, so on a live server this catches a
dead connection, not slow synthesis). Waiting for ``text_chunks`` is the caller's
business: the language model has its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from ..errors import BackendUnavailable
from ..speech import AudioChunk, SpokenWord, TtsEvent
from .connection import Advice, connect, new_session
from .float32 import samples
from .tts_wire import (
    STREAMING_PATH,
    Audio,
    ClientMessage,
    Eos,
    Error,
    Ready,
    ServerMessage,
    Text,
    Word,
    decode,
    encode,
)

log = logging.getLogger(__name__)

_ADVICE = Advice(
    slow="check that it is running and not overloaded",
    unreachable="start moshi-server with a TTS config, or point --tts at a running one",
    key="set TROUPE_TTS_API_KEY (or a file named by --tts-api-key-file) to one of its "
        "authorized_ids",
    route="such route",
    route_fix="check that --tts points at a moshi-server running a TTS config",
)


# ── text to words ────────────────────────────────────────────────────────────

_SPACES = re.compile(r"\s+")
# Unmute's prepare_text_for_tts: markdown marks are not spoken, curly quotes are
# straightened for the tokenizer.
_SPEAKABLE = str.maketrans({"*": None, "_": None, "`": None,
                            "“": '"', "”": '"', "‘": "'", "’": "'"})


async def words(chunks: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Whole words from text streamed in arbitrary pieces, cleaned for speech.

    moshi-server tokenizes each message word by word, so a word split across two
    messages would be spoken as two; a word is sent once the space after it (or the
    end of the text) has arrived, as Unmute's ``rechunk_to_words`` does."""
    pending = ""
    async for chunk in chunks:
        *complete, pending = _SPACES.split(pending + chunk)
        for word in complete:
            if spoken := word.translate(_SPEAKABLE):
                yield spoken
    if spoken := pending.translate(_SPEAKABLE):
        yield spoken


# ── the client ───────────────────────────────────────────────────────────────


class KyutaiTTS:
    """A moshi-server TTS at ``url`` (``ws://host:8089``; the path is added if missing).

    ``cfg_alpha``, ``seed``, ``temperature``, ``top_k`` and ``max_seq_len`` go in the
    query string when set, as Unmute sends them. moshi-server's batched TTS (the
    ``Py`` module Unmute deploys) reads only ``voice``, ``format`` and ``auth_id``
    and ignores the rest; its single-stream ``Tts`` module reads them all.

    ``timeout`` bounds connecting, the wait for ``Ready``, and, once all the text was
    sent (``Eos``), every silence until the server has spoken it. Before that the
    server may rightly say nothing (it waits for words ahead, and the language model
    may be slow to write them): ``heartbeat`` pings it that often instead, so a dead
    connection or a hung server shows within 1.5 × ``heartbeat``. Both are read at
    each reply, so a running server's can be changed.
    """

    def __init__(
        self, url: str, api_key: str = "public_token", cfg_alpha: float | None = 1.5,
        *, seed: int | None = None, temperature: float | None = None,
        top_k: int | None = None, max_seq_len: int | None = None,
        timeout: float = 30.0, close_timeout: float = 1.0, heartbeat: float = 10.0,
    ) -> None:
        self.url = url if url.rstrip("/").endswith(STREAMING_PATH) \
            else url.rstrip("/") + STREAMING_PATH
        self.api_key = api_key
        self.options: dict[str, float | int | None] = {
            "cfg_alpha": cfg_alpha, "seed": seed, "temperature": temperature,
            "top_k": top_k, "max_seq_len": max_seq_len,
        }
        self.timeout = timeout
        self.close_timeout = close_timeout
        self.heartbeat = heartbeat
        self._http: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return f"the TTS server at {self.url}"

    def voice_for(self, source: Mapping[str, Any]) -> str | None:
        """The server-side voice of a ``VOICE_SOURCE``: Unmute's ``path_on_server``,
        else its ``voice``, else the server's default."""
        voice = source.get("path_on_server") or source.get("voice")
        return str(voice) if voice else None

    async def start(self) -> None:
        if self._http is None:
            self._http = new_session()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def query(self, voice: str | None) -> dict[str, str]:
        """The query string for ``voice`` (a path under the server's voice folder,
        e.g. Unmute's ``path_on_server``; ``None``: the server's default voice)."""
        params = {"format": "PcmMessagePack", "voice": voice, **self.options}
        return {key: str(value) for key, value in params.items() if value is not None}

    async def speak(
        self, text_chunks: AsyncIterator[str], voice: str | None
    ) -> AsyncGenerator[TtsEvent, None]:
        """Speak the text as it streams in: words and audio in the order the server
        sends them, until it has spoken everything. Connects on the first ``anext``,
        so start iterating before the first word exists to hide the handshake.

        Raises ``BackendUnavailable`` when the server cannot be reached, refuses the
        key, is at capacity, errs, stalls or drops the connection; an exception from
        ``text_chunks`` ends the reply with that exception. Either way the socket is
        closed, as it is when the caller stops early."""
        ws = await self._connect(voice)
        reply: _Reply | None = None
        try:
            await self._wait_ready(ws)
            reply = _Reply(ws, self.name, self.timeout, self.heartbeat)
            reply.start(text_chunks)
            while (item := await reply.next()) is not None:
                yield item
        finally:
            if reply is not None:
                await reply.stop()
            await ws.close()

    async def _connect(self, voice: str | None) -> aiohttp.ClientWebSocketResponse:
        if self._http is None:
            raise RuntimeError("KyutaiTTS.speak() before start()")
        return await connect(self._http, self.url, api_key=self.api_key, where=self.name,
                             advice=_ADVICE, within=self.timeout,
                             close_timeout=self.close_timeout, heartbeat=self.heartbeat,
                             params=self.query(voice))

    async def _wait_ready(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Until ``Ready``. Frames left over from the channel's previous client can
        come first (Unmute saw this race in moshi-server): they are skipped."""
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await ws.receive()
                    if message.type is not aiohttp.WSMsgType.BINARY:
                        raise BackendUnavailable(
                            f"{self.name} closed the connection before it was ready; "
                            f"see its log")
                    match _decode_or_fail(message.data, self.name):
                        case Ready():
                            return
                        case Error(text):
                            raise BackendUnavailable(
                                f"{self.name} is at capacity ({text}): every channel of "
                                f"its batch is busy; retry later, or give it a larger "
                                f"batch_size")
                        case stale:
                            log.warning("%s sent %s before Ready; skipped",
                                        self.name, type(stale).__name__)
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{self.name} was not ready within {self.timeout:g} s; check that it "
                f"is running and not overloaded") from exc


def _decode_or_fail(frame: bytes, where: str) -> ServerMessage:
    try:
        return decode(frame)
    except msgspec.DecodeError as exc:
        raise BackendUnavailable(
            f"{where} sent a message this client does not understand ({exc}); is it "
            f"a moshi-server TTS?") from exc


class _Reply:
    """One reply on a ready socket: a writer task sends the words, a reader task
    decodes the answers, and both report to one queue. ``None`` in the queue: the
    server closed after ``Eos``, everything was spoken. Once ``Eos`` is out, the
    writer watches the reader: ``timeout`` seconds without a message is a stall."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, name: str, timeout: float,
                 heartbeat: float) -> None:
        self._ws = ws
        self._name = name
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._queue: asyncio.Queue[TtsEvent | BaseException | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._eos_sent = False
        self._words_sent = 0
        self._words_spoken = 0
        self._heard = asyncio.Event()
        """Set by the reader at each message."""

    def start(self, text_chunks: AsyncIterator[str]) -> None:
        self._tasks = [asyncio.create_task(self._write(text_chunks)),
                       asyncio.create_task(self._read())]

    async def next(self) -> TtsEvent | None:
        # Unbounded wait: the reader bounds every wait on the server, the language
        # model bounds its own.
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _write(self, text_chunks: AsyncIterator[str]) -> None:
        try:
            async with contextlib.aclosing(words(text_chunks)) as spoken:
                async for word in spoken:
                    if not await self._send(Text(word)):
                        return
                    self._words_sent += 1
        except Exception as exc:  # the text's source (the LLM) failed: so does the reply
            self._queue.put_nowait(exc)
            return
        self._eos_sent = True
        if await self._send(Eos()):
            await self._watch_the_end()

    async def _watch_the_end(self) -> None:
        """The server has all the text: from now on it must never be silent for
        ``timeout`` (the reader, done, cancels us through ``stop``)."""
        while True:
            self._heard.clear()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._heard.wait()
            except TimeoutError:
                self._queue.put_nowait(BackendUnavailable(
                    f"{self._name} sent nothing for {self._timeout:g} s mid-reply, with "
                    f"all the text sent; check that it is running and not overloaded"))
                return

    async def _send(self, message: ClientMessage) -> bool:
        try:
            await self._ws.send_bytes(encode(message))
        except (ConnectionError, aiohttp.ClientError):
            return False  # the socket is gone; the reader reports how
        return True

    async def _read(self) -> None:
        try:
            while (event := await self._receive()) is not None:
                self._queue.put_nowait(event)
        except BackendUnavailable as exc:
            self._queue.put_nowait(exc)
        else:
            if self._words_spoken != self._words_sent:
                log.warning("%s spoke %d of the %d words sent", self._name,
                            self._words_spoken, self._words_sent)
            self._queue.put_nowait(None)

    async def _receive(self) -> TtsEvent | None:
        """The next event; ``None`` at the clean end. Unbounded: before ``Eos`` the
        heartbeat watches the connection, after it the writer watches the silence."""
        while True:
            message = await self._ws.receive()
            self._heard.set()
            match message.type:
                case aiohttp.WSMsgType.BINARY:
                    pass
                case aiohttp.WSMsgType.CLOSE if self._eos_sent:
                    return None
                case aiohttp.WSMsgType.CLOSE:
                    raise BackendUnavailable(
                        f"{self._name} closed the connection before the reply was "
                        f"finished (code {message.data}); see its log")
                case aiohttp.WSMsgType.TEXT:
                    raise BackendUnavailable(
                        f"{self._name} sent a text frame ({message.data[:80]!r}); is it "
                        f"a moshi-server TTS?")
                case aiohttp.WSMsgType.ERROR if isinstance(message.data,
                                                           aiohttp.ServerTimeoutError):
                    raise BackendUnavailable(
                        f"{self._name} did not answer a ping within {self._heartbeat:g} s "
                        f"mid-reply; check that it is running and not overloaded")
                case _:  # CLOSED: the connection ended without a close frame; ERROR
                    raise BackendUnavailable(
                        f"the connection to {self._name} broke off mid-reply "
                        f"({message.data or message.type.name}); see its log")
            match _decode_or_fail(message.data, self._name):
                case Word(text="") | Ready():
                    continue
                case Word(text, start_s, stop_s):
                    self._words_spoken += 1
                    return SpokenWord(text, start_s, stop_s)
                case Audio(pcm):
                    return AudioChunk(samples(pcm))
                case Error(text):
                    raise BackendUnavailable(f"{self._name} failed mid-reply: {text}")
