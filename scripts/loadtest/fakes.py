"""The three protocol-faithful fake backends for ``python -m scripts.loadtest --spawn-server``,
in their own process so that their work is not counted as the load generator's.

    python -m scripts.loadtest.fakes '{"utterances": [{"words": [["Hello", 0.3], …],
                                                        "end": 3.1}, …],
                                       "period": 8.0, "reply": "…", "frames_per_word": 3}'
    stdout ◀── one JSON line: {"stt": "ws://127.0.0.1:…", "tts": "ws://…",
                               "llm": "http://…/v1", "model": "fake-model", "pid": …}
    then serves on 127.0.0.1 until SIGTERM, SIGINT or the end of its stdin (the
    load test closes it, or dies): it never outlives the run that started it.

The fakes are the test suite's own (``tests/fakes``), configured for a long run:

- STT (``LoopingKyutaiSTT``): moshi-server's ``/api/asr-streaming`` exactly, but the
  scripted utterances repeat every ``period`` seconds of audio for as long as a
  session streams, with the pause head high between them, so the server's
  turn-taking ends every utterance and answers it (and takes one that starts while
  the character speaks for a barge-in). It does not keep the audio it receives (the
  test fake keeps every sample for its assertions: gigabytes in a load test).
- LLM (``FakeOpenAI``): answers every request with the same streamed ``reply``.
- TTS (``FakeKyutaiTTS``): ``frames_per_word`` 80 ms frames of tone per word.
Each keeps only its last few connections' records.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import signal
import sys
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes.kyutai_stt import (
    FRAME_SAMPLES,
    FRAME_SEC,
    OTHER_HEADS,
    PAUSE_HEAD,
    PAUSED,
    SPEAKING,
    Connection,
    FakeKyutaiSTT,
)
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import FakeOpenAI, Reply, text

KEEP = 32
"""Connection records each fake keeps (the tests' fakes keep all of them)."""


class _Audio(msgspec.Struct):
    """An ``Audio`` or ``Marker`` message; ``pcm`` is counted, not decoded."""

    type: str
    pcm: msgspec.Raw = msgspec.Raw(b"")
    id: int | None = None


_decoder = msgspec.msgpack.Decoder(_Audio)


def array_length(data: bytes | msgspec.Raw) -> int | None:
    """Elements of the msgpack array ``data`` starts with; None if it is not one."""
    raw = memoryview(data)
    if not raw:
        return None
    first = raw[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(raw) >= 3:
        return int.from_bytes(raw[1:3], "big")
    if first == 0xDD and len(raw) >= 5:
        return int.from_bytes(raw[1:5], "big")
    return None


Heard = list[tuple[str, float]]
"""One utterance's words, each with the second it starts at."""


class LoopingTranscript:
    """One stream's answers, without I/O: the script (utterances, each its words and
    the second it ends) repeats every ``period`` seconds (a whole number of 80 ms
    frames). Words, ``EndWord``s and ``Step``s come out as ``FakeKyutaiSTT`` sends
    them, ``delay_steps`` frames after the audio they are about."""

    def __init__(self, utterances: list[tuple[Heard, float]], period: float,
                 delay_steps: int) -> None:
        self.period_frames = max(1, round(period / FRAME_SEC))
        self.delay_steps = delay_steps
        self.speech = [(words[0][1], end) for words, end in utterances if words]
        self.due: dict[int, list[tuple[str, str, float]]] = collections.defaultdict(list)
        for words, end in utterances:
            stops = [start for _, start in words[1:]] + [end]
            for (word, start), stop in zip(words, stops, strict=True):
                self.due[self._frame(start)].append(("Word", word, start))
                self.due[self._frame(stop)].append(("EndWord", word, stop))
        self.samples = 0
        self.frames = 0
        self.markers: list[tuple[int, int]] = []

    @staticmethod
    def _frame(seconds: float) -> int:
        return math.ceil(seconds / FRAME_SEC - 1e-9)

    def audio(self, samples: int) -> list[dict[str, Any]]:
        self.samples += samples
        out: list[dict[str, Any]] = []
        while (self.frames + 1) * FRAME_SAMPLES <= self.samples:
            self.frames += 1
            heard = self.frames - self.delay_steps
            if heard >= 0:
                cycle, offset = divmod(heard, self.period_frames)
                shift = cycle * self.period_frames * FRAME_SEC
                for kind, word, at in self.due.get(offset, ()):
                    out.append({"type": "Word", "text": word, "start_time": shift + at}
                               if kind == "Word" else
                               {"type": "EndWord", "stop_time": shift + at})
            out.append(self._step(heard))
            out += self._markers_due()
        return out

    def marker(self, marker_id: int) -> list[dict[str, Any]]:
        self.markers.append((math.ceil(self.samples / FRAME_SAMPLES) + self.delay_steps,
                             marker_id))
        return self._markers_due()

    def _step(self, heard: int) -> dict[str, Any]:
        at = (heard % self.period_frames) * FRAME_SEC
        speaking = heard >= 0 and any(start <= at < end for start, end in self.speech)
        prs = [OTHER_HEADS] * 4
        prs[PAUSE_HEAD] = SPEAKING if speaking else PAUSED
        return {"type": "Step", "step_idx": self.frames - 1, "prs": prs,
                "buffered_pcm": self.samples - self.frames * FRAME_SAMPLES}

    def _markers_due(self) -> list[dict[str, Any]]:
        due = [m for m in self.markers if m[0] <= self.frames]
        self.markers = [m for m in self.markers if m[0] > self.frames]
        return [{"type": "Marker", "id": marker_id} for _, marker_id in due]


class LoopingKyutaiSTT(FakeKyutaiSTT):
    """``FakeKyutaiSTT`` whose script repeats every ``period`` seconds of audio."""

    def __init__(self, utterances: list[tuple[Heard, float]], period: float) -> None:
        super().__init__(connections=collections.deque(maxlen=KEEP))  # type: ignore[arg-type]
        self.looping = (utterances, period)

    # Replaces the fake's private stream loop (same messages, same rules) with one
    # that loops the script and keeps no audio.
    async def _serve(self, request: web.Request, ws: web.WebSocketResponse,
                     connection: Connection) -> None:
        await ws.send_bytes(msgspec.msgpack.encode({"type": "Ready"}))
        stream = LoopingTranscript(*self.looping, delay_steps=self.delay_steps)
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                continue
            try:
                decoded = _decoder.decode(message.data)
            except msgspec.DecodeError:
                decoded = None
            count = array_length(decoded.pcm) if decoded is not None else None
            if decoded is not None and decoded.type == "Audio" and count is not None:
                out = stream.audio(count)
            elif decoded is not None and decoded.type == "Marker" and decoded.id is not None:
                out = stream.marker(decoded.id)
            else:  # as moshi-server: a message it cannot parse ends the connection
                connection.rejected.append(message.data[:64])
                await ws.close(code=WSCloseCode.INTERNAL_ERROR)
                return
            for reply in out:
                await ws.send_bytes(msgspec.msgpack.encode(reply))


class EndlessReplies(collections.deque[Reply]):
    """A script that never runs out: every request gets ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__()
        self.reply = reply

    def __bool__(self) -> bool:
        return True

    def popleft(self) -> Reply:
        return self.reply


async def serve(script: dict[str, Any]) -> None:
    utterances = [([(str(word), float(start)) for word, start in utterance["words"]],
                   float(utterance["end"])) for utterance in script["utterances"]]
    stt = LoopingKyutaiSTT(utterances, float(script["period"]))
    tts = FakeKyutaiTTS(frames_per_word=int(script["frames_per_word"]),
                        connections=collections.deque(maxlen=KEEP))  # type: ignore[arg-type]
    pieces = [word + " " for word in str(script["reply"]).split()]
    llm = FakeOpenAI(replies=EndlessReplies(text(*pieces)),
                     requests=collections.deque(maxlen=KEEP),  # type: ignore[arg-type]
                     headers=collections.deque(maxlen=KEEP))  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_reader(sys.stdin.fileno(), _stdin_readable, stop)
    try:
        urls = {"stt": await stt.start(), "tts": await tts.start(),
                "llm": await llm.start(), "model": llm.models[0], "pid": os.getpid()}
        print(json.dumps(urls), flush=True)
        await stop.wait()
    finally:
        loop.remove_reader(sys.stdin.fileno())
        for fake in (stt, tts, llm):
            await fake.close()


def _stdin_readable(stop: asyncio.Event) -> None:
    """The load test holds our stdin open; its end (or anything on it) means stop."""
    stop.set()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scripts.loadtest.fakes SCRIPT_JSON", file=sys.stderr)
        return 2
    asyncio.run(serve(json.loads(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
