"""The load test's sessions: what each one does on its WebSocket, and what it measures.

    open ──▶ session.created ──▶ session.characters.list ─▶ .listed   (session start)
               (permessage-deflate offered, as browsers and the websockets library do,
               unless the run turns compression off)
    streaming: input_audio_buffer.append every 80 ms, on an absolute schedule (the
               cycle of scripts/loadtest/audio.py, looped), while a reader takes the
               replies: response.created ─▶ response.output_audio.delta … ─▶ response.done
               (completed, or cancelled when an utterance of the cycle cut it short)
    reloading: session.characters.reload {one of its own directories} ─▶ .reloaded,
               then session.characters.list ─▶ .listed; both answers checked exactly
    churn:     open, one reload (checked), close

Each session has one reader task; requests wait for their answer through it (one
request at a time per session, as the server answers them in order). Events are
decoded into a small Struct holding only the fields the load test reads.

Audio-frame lateness (milliseconds, never negative) of frame k of a reply, where
t0 is the arrival of the reply's first audio frame, S_k the samples before frame k
(24 kHz) and ``lead`` the server's ``--audio-lead``::

    lateness_k = max(0, arrival_k − (t0 + max(0, S_k / 24000 − lead)))

The server sends a reply's first ``lead`` seconds at once and every later frame
``lead`` ahead of real time, so a frame on time arrives by t0 + S_k/24000 − lead;
the first frame itself is the reference and is not counted. A reply cut short by
an interruption just stops: its frames up to its ``response.done`` count as any
other, and a frame that arrives outside its reply (after that ``response.done``, or
naming another response) is not counted, only tallied (``stale_frames``). Time to
first audio is from sending the last 80 ms of an utterance to the first audio frame
of the reply to the turn that utterance ended.

Turns (``Recorder.turns``): each utterance the session finishes is a turn asked. The
server takes turns (``conversation.item.input_audio_transcription.completed``, whose
words say which utterances it holds: two when the person went on before the server
ended the first) and begins a reply (``response.created``) for each. A reply is
going between its ``response.created`` and ``response.done``, and while audio
received is still playing; an interruption of the cycle that starts while one is
going is an interruption made (``Recorder.interruptions``), one that finds none
(its reply not begun yet, or over) is missed; a question that starts while one is
going (a reply so late that it runs into the next question) is ``talked_over``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from .audio import CHUNK_SEC, SAMPLE_RATE, Cycle, pcm16_samples_in
from .stats import Recorder

AUDIO_DELTA = "response.output_audio.delta"
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
COMPRESSION = 15
"""``ws_connect(compress=…)``: offer permessage-deflate with a 32 kB window, as
browsers and the websockets library do; 0 offers nothing."""


class _Character(msgspec.Struct):
    name: str


class _Error(msgspec.Struct):
    code: str | None = None
    message: str = ""


class _Response(msgspec.Struct):
    id: str = ""
    status: str = ""


class _Session(msgspec.Struct):
    id: str = ""


class Event(msgspec.Struct):
    """The fields of a server event the load test reads; the rest is skipped."""

    type: str
    delta: str = ""
    response_id: str = ""
    transcript: str = ""
    characters: list[_Character] = msgspec.field(default_factory=list)
    error: _Error | None = None
    response: _Response | None = None
    session: _Session | None = None
    duration_ms: float | None = None


_decoder = msgspec.json.Decoder(Event)


class Failed(Exception):
    """A session could not do what it was asked; ``code`` is the server's error code,
    or ``client.…`` for what the client saw. The run has counted it already."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


@dataclass
class Run:
    """What every session of a run shares."""

    http: aiohttp.ClientSession
    url: str
    recorder: Recorder
    zero: float
    """``time.monotonic()`` at the start of the run."""
    audio_lead: float
    timeout: float
    compress: int = COMPRESSION

    def now(self) -> float:
        return time.monotonic() - self.zero

    def error(self, code: str, message: str = "", session_id: str = "") -> None:
        self.recorder.error(self.now(), code, message, session_id)

    def failed(self, code: str, message: str = "", session_id: str = "") -> Failed:
        """Count a failure, and return it to raise."""
        self.error(code, message, session_id)
        return Failed(code, message)


class _Reply:
    def __init__(self, response_id: str, after_speech: float | None) -> None:
        self.id = response_id
        self.after_speech = after_speech
        self.first: float | None = None
        self.samples = 0
        self.done = False

    def going(self, now: float) -> bool:
        """Still in progress at ``now``, or its audio received still playing."""
        return not self.done or (self.first is not None
                                 and now < self.first + self.samples / SAMPLE_RATE)


class Session:
    """One open WebSocket session; ``open`` it, ``close`` it."""

    def __init__(self, run: Run, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.run = run
        self.ws = ws
        self.id = ""
        self._waiting: tuple[frozenset[str], asyncio.Future[Event]] | None = None
        self._reply: _Reply | None = None
        self._ended: collections.deque[tuple[float, int]] = collections.deque()
        """Utterances finished and not yet in a turn the server took: (when, words)."""
        self._taken: list[float] = []
        """When each utterance of the turn the server took last, not answered yet, ended."""
        self._closing = False
        self._counted = False
        self._reader = asyncio.create_task(self._read(), name="loadtest-reader")

    @classmethod
    async def open(cls, run: Run) -> Session:
        """Connect, wait for ``session.created`` and list the default characters,
        timing both. Raises ``Failed``."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(run.timeout):
                ws = await run.http.ws_connect(run.url, protocols=("realtime",),
                                               compress=run.compress,
                                               timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        except aiohttp.WSServerHandshakeError as exc:
            raise run.failed(f"client.http_{exc.status}", str(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise run.failed("client.connect_failed", str(exc)) from None
        except TimeoutError:
            raise run.failed("client.timeout", f"connecting to {run.url}") from None
        if run.compress:
            if ws.compress:
                run.recorder.compressed += 1
            else:
                run.recorder.uncompressed += 1
        session = cls(run, ws)
        try:
            created = await session.expect("session.created")
            session.id = created.session.id if created.session else ""
            run.recorder.session_ids.add(session.id)
            created_at = time.monotonic()
            await session.request({"type": "session.characters.list"},
                                  "session.characters.listed")
        except BaseException:
            await session.close()
            raise
        listed_at = time.monotonic()
        run.recorder.session_created_ms.add(run.now(), (created_at - started) * 1000)
        run.recorder.session_start_ms.add(run.now(), (listed_at - started) * 1000)
        run.recorder.sessions_opened += 1
        run.recorder.sessions_open += 1
        session._counted = True
        return session

    async def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._uncount()
            self._count_open_turns()
            with contextlib.suppress(Exception):
                await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    def _count_open_turns(self) -> None:
        """The turns not answered at the close: in flight, or lost."""
        turns, now = self.run.recorder.turns, time.monotonic()
        for ended in [*self._taken, *(ended for ended, _ in self._ended)]:
            if now - ended < self.run.timeout:
                turns.in_flight += 1
            else:
                turns.unanswered += 1
        self._taken, self._ended = [], collections.deque()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.run.recorder.sessions_open -= 1

    @property
    def closed(self) -> bool:
        return self._closing or self._reader.done()

    # ── requests ─────────────────────────────────────────────────────────────

    async def expect(self, *types: str) -> Event:
        """The next event of one of ``types``. Raises ``Failed`` on an error event,
        a closed connection or the run's timeout."""
        return await self._answer(self._wait_for(types), types)

    async def request(self, event: dict[str, Any], *answers: str) -> Event:
        """Send ``event`` and return its answer, as ``expect``."""
        answer = self._wait_for(answers)
        try:
            await self.ws.send_str(json.dumps(event))
        except (ConnectionError, aiohttp.ClientError) as exc:
            self._waiting = None
            raise self.run.failed("client.send_failed", str(exc), self.id) from None
        return await self._answer(answer, answers)

    def _wait_for(self, types: Sequence[str]) -> asyncio.Future[Event]:
        if self._reader.done():
            raise Failed("client.closed", "the connection is closed")
        answer: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiting = (frozenset(types), answer)
        return answer

    async def _answer(self, answer: asyncio.Future[Event], types: Sequence[str]) -> Event:
        try:
            async with asyncio.timeout(self.run.timeout):
                return await answer
        except TimeoutError:
            raise self.run.failed("client.timeout", f"no {' or '.join(types)} within "
                                  f"{self.run.timeout:g} s", self.id) from None
        finally:
            self._waiting = None

    # ── streaming ────────────────────────────────────────────────────────────

    async def stream(self, cycle: Cycle, stop: asyncio.Event, phase: float = 0.0) -> None:
        """After ``phase`` seconds of quiet, send ``cycle`` in a loop, 80 ms each on an
        absolute schedule (late appends go at once, so the stream keeps real time on
        average), until ``stop``. The STT's clock starts with the first append, so
        sessions with different phases speak at different times, as people do."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(phase):
                await stop.wait()
        if stop.is_set():
            return
        recorder = self.run.recorder
        recorder.streaming += 1
        started = time.monotonic()
        starts, ends = cycle.starts, cycle.ends
        try:
            for sent in itertools.count():
                delay = started + sent * CHUNK_SEC - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stop.is_set() or self.closed:
                    return
                index = sent % len(cycle.appends)
                if (starting := starts.get(index)) is not None:
                    self._speaking(time.monotonic(), starting.offset is not None)
                try:
                    await self.ws.send_str(cycle.appends[index])
                except (ConnectionError, aiohttp.ClientError):
                    return  # the reader counts the closed connection
                if (utterance := ends.get(index)) is not None:
                    self._ended.append((time.monotonic(), len(utterance.words)))
                    recorder.turns.asked += 1
        finally:
            recorder.streaming -= 1

    def _speaking(self, now: float, interruption: bool) -> None:
        """An utterance starts: over the character, if a reply is going."""
        reply, recorder = self._reply, self.run.recorder
        going = reply is not None and reply.going(now)
        if not interruption:
            recorder.talked_over += going
        elif not going:
            recorder.interruptions_missed += 1
        else:
            recorder.interruptions += 1
            if reply is not None and reply.first is not None:
                recorder.interrupted_at_ms.add(self.run.now(), (now - reply.first) * 1000)

    # ── the reader ───────────────────────────────────────────────────────────

    async def _read(self) -> None:
        try:
            await self._receive()
        except Exception as exc:  # a defect here: counted, never a silent end
            self.run.error("client.reader_failed", repr(exc), self.id)
            self._uncount()
            self._fail(Failed("client.reader_failed", repr(exc)))

    async def _receive(self) -> None:
        run = self.run
        while True:
            message = await self.ws.receive()
            arrived = time.monotonic()
            if message.type is aiohttp.WSMsgType.TEXT:
                try:
                    event = _decoder.decode(message.data)
                except msgspec.DecodeError as exc:
                    run.error("client.bad_event", f"{exc}: {message.data[:200]}", self.id)
                    continue
                self._dispatch(event, arrived)
                continue
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                if not self._closing:
                    code = self.ws.close_code
                    run.error(f"client.closed_{code}", str(message.extra or ""), self.id)
                    self._uncount()
                self._fail(Failed("client.closed", f"code {self.ws.close_code}"))
                return

    def _fail(self, failure: Failed) -> None:
        if self._waiting is not None and not self._waiting[1].done():
            self._waiting[1].set_exception(failure)

    def _dispatch(self, event: Event, arrived: float) -> None:
        kind = event.type
        if kind == AUDIO_DELTA:
            self._audio(event, arrived)
            return
        waiting = self._waiting
        if kind == "error":
            code = (event.error.code if event.error else None) or "unknown_error"
            message = event.error.message if event.error else ""
            self.run.error(code, message, self.id)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_exception(Failed(code, message))
            return
        if waiting is not None and kind in waiting[0] and not waiting[1].done():
            waiting[1].set_result(event)
        if kind == TRANSCRIBED:
            self._turn_taken(len(event.transcript.split()))
        elif kind == "response.created":
            turns = self.run.recorder.turns
            taken, self._taken = self._taken, []
            if taken:
                turns.answered += len(taken)
                turns.merged += len(taken) - 1
            else:
                turns.unprompted += 1
            self._reply = _Reply(event.response.id if event.response else "",
                                 taken[-1] if taken else None)
        elif kind == "response.done":
            status = event.response.status if event.response else "unknown"
            self.run.recorder.responses[status] += 1
            if self._reply is not None:
                self._reply.done = True

    def _turn_taken(self, words: int) -> None:
        """The server took a turn of ``words`` words: the utterances it holds are
        the oldest finished ones (more than one when the person went on speaking
        before the server ended the first). A turn taken before and still waiting
        for its reply will not get one of its own."""
        if self._taken:
            self.run.recorder.turns.superseded += len(self._taken)
        self._taken = []
        while self._ended and (words > 0 or not self._taken):
            ended, said = self._ended.popleft()
            self._taken.append(ended)
            words -= said

    def _audio(self, event: Event, arrived: float) -> None:
        reply, run = self._reply, self.run
        if reply is None or reply.done or (event.response_id and reply.id
                                           and event.response_id != reply.id):
            run.recorder.stale_frames += 1
            return
        delta = event.delta
        if reply.first is None:
            reply.first = arrived
            if reply.after_speech is not None:
                run.recorder.first_audio_ms.add(run.now(), (arrived - reply.after_speech) * 1000)
        else:
            due = reply.first + max(0.0, reply.samples / SAMPLE_RATE - run.audio_lead)
            run.recorder.frame_lateness_ms.add(run.now(), max(0.0, arrived - due) * 1000)
        reply.samples += pcm16_samples_in(delta)
