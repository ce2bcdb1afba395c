"""Speech to text through Kyutai STT: a client of moshi-server's ``/api/asr-streaming``.

    KyutaiSTT(url, api_key).open() ──▶ KyutaiSTTStream  (header ``kyutai-api-key``)
                                   ◀── Ready             (Error{message} instead: at capacity)
    stream.send_audio(float32 @ 24 kHz)
        ──▶ Audio{pcm: 1920 float32}  one per 80 ms frame; a partial frame waits for more
    stream.flush()
        ──▶ Audio{rest, zero-padded}, Marker{id}, Audio{silence} … until Marker{id} returns
    async for event in stream:
        ◀── Word{text, start_time}          → Word
        ◀── EndWord{stop_time}              → EndWord
        ◀── Step{step_idx, prs, buffered_pcm} → Pause(prs[2], time)  (none for the first 12)
        ◀── Marker{id}                      → Flushed(id)
        ◀── Error{message}                  → raises BackendUnavailable

The messages are msgpack maps (``stt_wire``); ``stt_stream`` holds a conversation's
stream, ``connection`` the handshake both Kyutai clients share.

What Unmute (``unmute/stt/speech_to_text.py``, ``unmute/unmute_handler.py``) taught:

- The pause probability is ``prs[2]``, one of the model's four pause heads; the
  first 12 steps are noise and are skipped. Unmute ends a turn above 0.6 and lets
  speech interrupt the bot below 0.4 (that policy lives in the turn-taking code).
- A step's time is counted, not read from ``step_idx`` (a batched server numbers
  steps across all its streams): ``steps × 80 ms − delay_sec``.
- The server answers with a delay (``asr_delay_in_tokens``, 6 steps for
  ``stt-1b-en_fr``, Unmute's 0.5 s): the last words only come out once that much
  more audio went in, hence ``flush``. It echoes a marker once every frame sent
  before it, plus that delay, has been processed.
- The first ``Word`` of a stream may have empty text.

moshi-server drops a stream that sends no audio for 120 s, and only its
``BatchedAsr`` module says ``Ready`` (the plain ``Asr`` module never does, so
``open`` times out on it). Every failure becomes ``BackendUnavailable``, whose
message names the URL and says what to do.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from ..errors import BackendUnavailable
from .connection import API_KEY_HEADER, Advice, connect, new_session
from .stt_stream import KyutaiSTTStream
from .stt_wire import ASR_PATH, Error, Ready, decode
from .stt_wire import FRAME_SAMPLES as FRAME_SAMPLES  # where callers have found it

SETTLE_STEPS = 12
"""Steps whose pause prediction Unmute ignores: "all over the place" at first."""

_ADVICE = Advice(
    slow="check that moshi-server is running there",
    unreachable="start moshi-server with an STT config, or point the STT URL at a "
                "running one",
    key=f"set the STT API key (sent as the {API_KEY_HEADER} header; TROUPE_STT_API_KEY "
        f"or a file named by --stt-api-key-file) to one of the server's authorized_ids",
    route=ASR_PATH,
    route_fix="check the URL and that the server runs an STT config",
)


class KyutaiSTT:
    """A moshi-server STT at ``url`` (``ws://host:8090``; ``/api/asr-streaming`` is
    added unless the URL ends with it). One ``KyutaiSTTStream`` per conversation.

    ``timeout`` bounds connecting, the wait for ``Ready``, each send, a flush and a
    close. ``delay_sec`` is the server's answer delay (0.5 s for ``stt-1b-en_fr``);
    a flush sends that much silence at once, then more, up to ``max_flush_sec``, if
    the marker is still out. ``heartbeat`` pings the server that often: a dead
    connection shows within 1.5 × ``heartbeat``.
    """

    def __init__(
        self, url: str, api_key: str = "public_token", *,
        http: aiohttp.ClientSession | None = None, timeout: float = 10.0,
        delay_sec: float = 0.5, max_flush_sec: float = 5.0, heartbeat: float = 10.0,
        settle_steps: int = SETTLE_STEPS,
    ) -> None:
        stripped = url.rstrip("/")
        self.url = stripped if stripped.endswith(ASR_PATH) else stripped + ASR_PATH
        self.api_key = api_key
        self.timeout = timeout
        self.delay_sec = delay_sec
        self.max_flush_sec = max_flush_sec
        self.heartbeat = heartbeat
        self.settle_steps = settle_steps
        self._http = http
        self._owns_http = http is None
        self._streams: set[KyutaiSTTStream] = set()

    pause_hold = 0.0
    """Kyutai's pause heads already say "finished": no need to hold them."""
    speech_starts_turn = False
    """Only a recognised word starts the person's turn (and interrupts a reply)."""

    @property
    def name(self) -> str:
        return f"the speech-to-text server at {self.url}"

    async def start(self) -> None:
        if self._http is None:
            self._http = new_session()

    async def close(self) -> None:
        """Close the open streams, and the HTTP session if this client made it."""
        for stream in list(self._streams):
            await stream.close()
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> KyutaiSTT:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> KyutaiSTTStream:
        """Connect, wait for ``Ready``, and start reading the server's messages.

        Raises ``BackendUnavailable``: unreachable, the key refused, at capacity
        (``Error`` instead of ``Ready``), or no ``Ready`` within ``timeout``."""
        await self.start()
        assert self._http is not None  # start() made it
        where = f"the speech-to-text server at {self.url}"
        ws = await connect(self._http, self.url, api_key=self.api_key, where=where,
                           advice=_ADVICE, within=self.timeout, close_timeout=self.timeout,
                           heartbeat=self.heartbeat)
        try:
            await self._await_ready(ws, where)
        except BaseException:
            await ws.close()
            raise
        stream = KyutaiSTTStream(self, ws)
        stream.start()
        self._streams.add(stream)
        return stream

    async def _await_ready(self, ws: aiohttp.ClientWebSocketResponse[Any], where: str) -> None:
        try:
            message = await ws.receive(timeout=self.timeout)
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{where} did not say Ready within {self.timeout:g} s; it must serve "
                f"{ASR_PATH} with a BatchedAsr module (the plain Asr module never says "
                f"Ready)") from exc
        if message.type is not aiohttp.WSMsgType.BINARY:
            raise BackendUnavailable(
                f"{where} closed the connection before saying Ready ({message.type.name}, "
                f"{ws.close_code}); see its log")
        try:
            first = decode(message.data)
        except msgspec.DecodeError as exc:
            raise BackendUnavailable(
                f"{where} does not speak Kyutai's STT protocol ({exc}); check the URL") from exc
        match first:
            case Ready():
                return
            case Error(message=reason):
                raise BackendUnavailable(
                    f"{where} is at capacity ({reason}); try again later, or give it a "
                    f"larger batch_size")
        raise BackendUnavailable(
            f"{where} sent {type(first).__name__} before Ready; check that it runs "
            f"moshi-server's BatchedAsr")

    def _forget(self, stream: KyutaiSTTStream) -> None:
        self._streams.discard(stream)
