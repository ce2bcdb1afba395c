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

All messages are msgpack maps tagged by ``type`` (moshi-server's serde
``#[serde(tag = "type")]`` enums ``InMsg``/``OutMsg`` in ``rust/moshi-server/src/asr.rs``).
Audio goes out as float32, as Unmute sends it (``use_single_float``): half the bytes
of msgspec's float64.

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

import asyncio
import contextlib
import itertools
import logging
import math
from types import TracebackType
from typing import Any

import aiohttp
import msgspec
import numpy as np
import numpy.typing as npt

from ...audio.pcm import SAMPLE_RATE, Samples
from ..errors import BackendUnavailable
from ..speech import EndWord, Event, Flushed, Pause, Word

log = logging.getLogger(__name__)

FRAME_SAMPLES = 1920
FRAME_SEC = FRAME_SAMPLES / SAMPLE_RATE
ASR_PATH = "/api/asr-streaming"
API_KEY_HEADER = "kyutai-api-key"
PAUSE_HEAD = 2
"""The entry of ``Step.prs`` Unmute reads as the pause probability."""
SETTLE_STEPS = 12
"""Steps whose pause prediction Unmute ignores: "all over the place" at first."""


# ── the wire ─────────────────────────────────────────────────────────────────


class _Message(msgspec.Struct, tag=True, tag_field="type"):
    """A msgpack map whose ``type`` is the class name."""


class Audio(_Message):
    pcm: list[float]
    """Mono float samples at 24 kHz; moshi-server cuts them into 1920-sample frames."""


class Marker(_Message):
    """Sent by the client; echoed once the audio before it has been transcribed."""

    id: int


class Ready(_Message):
    pass


class WordMessage(_Message, tag="Word"):
    text: str
    start_time: float
    """Seconds into the stream's audio."""


class EndWordMessage(_Message, tag="EndWord"):
    stop_time: float


class Step(_Message):
    step_idx: int
    prs: list[float]
    """Pause probabilities, one per prediction head (four for ``stt-1b-en_fr``)."""
    buffered_pcm: int = 0
    """Samples the server holds that do not yet fill a frame."""


class Error(_Message):
    message: str


ClientMessage = Audio | Marker
ServerMessage = Ready | WordMessage | EndWordMessage | Step | Marker | Error

_encoder = msgspec.msgpack.Encoder()
_server_messages = msgspec.msgpack.Decoder(ServerMessage)


class _Float32Audio(_Message, tag="Audio"):
    pcm: msgspec.Raw
    """A msgpack array of float32, built by ``_float32_array``."""


def encode_audio(frame: Samples) -> bytes:
    """``Audio{pcm}`` with the samples as msgpack float32."""
    return _encoder.encode(_Float32Audio(msgspec.Raw(_float32_array(frame))))


def _float32_array(samples: Samples) -> bytes:
    items = np.empty(len(samples), dtype=[("marker", "u1"), ("value", ">f4")])
    items["marker"] = 0xCA  # msgpack float32
    items["value"] = samples
    n = len(samples)
    header = b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")
    return header + items.tobytes()


class _End(msgspec.Struct, frozen=True):
    failure: BackendUnavailable | None


# ── the client ───────────────────────────────────────────────────────────────


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
            # No connection cap: each session holds one socket (aiohttp's default
            # of 100 refused the 101st session's speech).
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

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
        try:
            async with asyncio.timeout(self.timeout):
                ws = await self._http.ws_connect(
                    self.url, headers={API_KEY_HEADER: self.api_key},
                    heartbeat=self.heartbeat,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.timeout),
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise _refused(where, exc) from exc
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{where} did not accept a connection within {self.timeout:g} s; check "
                f"that moshi-server is running there") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendUnavailable(
                f"cannot reach {where} ({exc or type(exc).__name__}); start moshi-server "
                f"with an STT config, or point the STT URL at a running one") from exc
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
            first = _server_messages.decode(message.data)
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


def _refused(where: str, exc: aiohttp.WSServerHandshakeError) -> BackendUnavailable:
    if exc.status in (401, 403):
        return BackendUnavailable(
            f"{where} refused the API key (HTTP {exc.status}); set the STT API key (sent "
            f"as the {API_KEY_HEADER} header; TROUPE_STT_API_KEY or a file named by "
            f"--stt-api-key-file) to one of the server's authorized_ids")
    if exc.status == 404:
        return BackendUnavailable(
            f"{where} has no {ASR_PATH} (HTTP 404); check the URL and that the server "
            f"runs an STT config")
    return BackendUnavailable(
        f"{where} refused the WebSocket (HTTP {exc.status} {exc.message}); see its log")


class KyutaiSTTStream:
    """One conversation's audio in, its transcript out; from ``KyutaiSTT.open``
    (an ``STTStream``).

    Iterate it for events (one consumer; it ends after ``close``, raises
    ``BackendUnavailable`` when the server fails). A reader task, started by
    ``start``, takes the server's messages off the socket as they come, so ``flush``
    works while nobody iterates; consume the events or they pile up.
    """

    def __init__(self, stt: KyutaiSTT, ws: aiohttp.ClientWebSocketResponse[Any]) -> None:
        self._stt = stt
        self._ws = ws
        self._where = f"the speech-to-text server at {stt.url}"
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._pending: Samples = np.zeros(0, dtype=np.float32)
        self._markers: dict[int, asyncio.Future[None]] = {}
        self._marker_ids = itertools.count(1)
        self._stepped = asyncio.Event()
        self._failure: BackendUnavailable | None = None
        self._closing = False
        self.frames_sent = 0
        self.steps_received = 0
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading the server's messages (once, before anything else)."""
        if self._reader is None:
            self._reader = asyncio.create_task(
                self._read(), name=f"kyutai-stt reader {self._stt.url}")

    @property
    def audio_sent_sec(self) -> float:
        """Audio sent so far, silence from flushes included."""
        return self.frames_sent * FRAME_SEC

    # ── audio in ─────────────────────────────────────────────────────────────

    async def send_audio(self, pcm: npt.ArrayLike) -> None:
        """Send mono samples at 24 kHz in 1920-sample frames; a partial frame waits
        for the next call (or ``flush``). Raises ``ValueError`` for non-mono audio,
        ``BackendUnavailable`` when the server is gone."""
        samples = np.asarray(pcm, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono audio (one dimension), got shape {samples.shape}")
        self._check_open()
        if self._pending.size:
            samples = np.concatenate((self._pending, samples))
        whole = len(samples) - len(samples) % FRAME_SAMPLES
        for start in range(0, whole, FRAME_SAMPLES):
            await self._send_frame(samples[start:start + FRAME_SAMPLES])
        self._pending = samples[whole:].copy()

    async def flush(self) -> None:
        """Get the words of all audio sent so far out of the server, as Unmute does
        at the end of a turn: the partial frame zero-padded, a marker, then silence
        until the marker comes back. The words arrive as events before ``Flushed``.

        Raises ``BackendUnavailable`` if the marker does not return within
        ``timeout``, or ``max_flush_sec`` of silence after it."""
        self._check_open()
        if self._pending.size:
            padded = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            padded[:len(self._pending)] = self._pending
            self._pending = np.zeros(0, dtype=np.float32)
            await self._send_frame(padded)
        marker_id = next(self._marker_ids)
        echoed = self._markers[marker_id] = asyncio.get_running_loop().create_future()
        silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        most = math.ceil(self._stt.max_flush_sec / FRAME_SEC)
        sent = 0
        try:
            async with asyncio.timeout(self._stt.timeout):
                await self._send(_encoder.encode(Marker(marker_id)))
                # Unmute's amount: the server's delay and a frame to spare.
                for _ in range(math.ceil(self._stt.delay_sec / FRAME_SEC) + 1):
                    await self._send_frame(silence)
                    sent += 1
                while not echoed.done():
                    self._stepped.clear()
                    if self.steps_received + 1 >= self.frames_sent:
                        # Caught up, marker still out: the delay is longer than assumed.
                        if sent >= most:
                            raise BackendUnavailable(
                                f"{self._where} did not return a flush marker after "
                                f"{sent * FRAME_SEC:.2f} s of silence; see its log")
                        await self._send_frame(silence)
                        sent += 1
                    stepped = asyncio.ensure_future(self._stepped.wait())
                    try:
                        await asyncio.wait((echoed, stepped),
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stepped.cancel()
                echoed.result()
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{self._where} did not finish a flush within {self._stt.timeout:g} s; "
                f"check that it is not overloaded") from exc
        finally:
            self._markers.pop(marker_id, None)

    async def _send_frame(self, frame: Samples) -> None:
        await self._send(encode_audio(frame))
        self.frames_sent += 1

    async def _send(self, data: bytes) -> None:
        self._check_open()
        try:
            async with asyncio.timeout(self._stt.timeout):
                await self._ws.send_bytes(data)
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{self._where} stopped taking audio for {self._stt.timeout:g} s; check "
                f"that it is not overloaded") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise self._failure or BackendUnavailable(
                f"the connection to {self._where} broke off ({exc}); see its log") from exc

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise RuntimeError(f"the stream to {self._where} is closed")

    # ── events out ───────────────────────────────────────────────────────────

    def __aiter__(self) -> KyutaiSTTStream:
        return self

    async def __anext__(self) -> Event:
        item = await self._events.get()
        if isinstance(item, _End):
            self._events.put_nowait(item)  # every later read ends the same way
            if item.failure is not None:
                raise item.failure
            raise StopAsyncIteration
        return item

    async def _read(self) -> None:
        """Takes messages off the socket until it closes; the connection's fate
        ends the event stream. A dead peer ends it through the heartbeat."""
        failure: BackendUnavailable | None = None
        try:
            while failure is None:
                message = await self._ws.receive()
                match message.type:
                    case aiohttp.WSMsgType.BINARY:
                        failure = self._dispatch(_server_messages.decode(message.data))
                    case aiohttp.WSMsgType.ERROR:
                        failure = BackendUnavailable(
                            f"the connection to {self._where} broke off ({message.data}); "
                            f"see its log")
                    case (aiohttp.WSMsgType.CLOSE | aiohttp.WSMsgType.CLOSING
                          | aiohttp.WSMsgType.CLOSED):
                        if not self._closing:
                            failure = self._closed_mid_stream()
                        break
        except msgspec.DecodeError as exc:
            failure = BackendUnavailable(
                f"{self._where} sent a message outside Kyutai's STT protocol ({exc}); "
                f"check that it runs a compatible moshi-server")
        except Exception as exc:  # the task's edge: nobody else would ever see it
            log.exception("reading from %s failed", self._where)
            failure = BackendUnavailable(f"reading from {self._where} failed ({exc!r})")
        finally:
            if failure is not None and not self._closing:
                log.warning("%s", failure.message)
                self._failure = failure
            for echoed in self._markers.values():
                if not echoed.done():
                    if self._failure is not None:
                        echoed.set_exception(self._failure)
                    else:
                        echoed.set_result(None)
            self._stepped.set()
            self._events.put_nowait(_End(self._failure))
        if failure is not None and not self._ws.closed:
            await self._ws.close()

    def _closed_mid_stream(self) -> BackendUnavailable:
        code = self._ws.close_code
        if code in (None, aiohttp.WSCloseCode.ABNORMAL_CLOSURE):
            return BackendUnavailable(
                f"the connection to {self._where} broke off mid-stream; see its log")
        return BackendUnavailable(
            f"{self._where} closed the connection mid-stream (code {code}); see its log")

    def _dispatch(self, message: ServerMessage) -> BackendUnavailable | None:
        match message:
            case WordMessage(text=text, start_time=start_time):
                self._events.put_nowait(Word(text, start_time))
            case EndWordMessage(stop_time=stop_time):
                self._events.put_nowait(EndWord(stop_time))
            case Step(prs=prs):
                self.steps_received += 1
                self._stepped.set()
                if self.steps_received > self._stt.settle_steps and len(prs) > PAUSE_HEAD:
                    time = self.steps_received * FRAME_SEC - self._stt.delay_sec
                    self._events.put_nowait(Pause(prs[PAUSE_HEAD], time))
            case Marker(id=marker_id):
                echoed = self._markers.get(marker_id)
                if echoed is not None and not echoed.done():
                    echoed.set_result(None)
                self._events.put_nowait(Flushed(marker_id))
            case Error(message=reason):
                return BackendUnavailable(f"{self._where} reported an error: {reason}")
            case Ready():
                pass
        return None

    # ── the end ──────────────────────────────────────────────────────────────

    async def close(self) -> None:
        """Close the connection; the events end once the queued ones are read.
        A flush waiting for its marker returns."""
        if not self._closing:
            self._closing = True
            self._stt._forget(self)
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                await self._ws.close()  # bounded by ClientWSTimeout.ws_close
        if self._reader is None:  # never started: nothing will end the events
            self._events.put_nowait(_End(self._failure))
            return
        try:
            async with asyncio.timeout(self._stt.timeout):
                await asyncio.shield(self._reader)
        except TimeoutError:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> KyutaiSTTStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
