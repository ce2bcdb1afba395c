"""Ogg Opus audio for the Unmute dialect: pages in, samples out, and back.

The Unmute web frontend records the microphone as one continuous Ogg Opus stream
and plays the character's voice from another; each lasts the whole session. Inside,
the server only handles float32 mono samples at 24 kHz::

    input_audio_buffer.append          OpusDecoder.decode(bytes)
    base64 of any slice of    ------>  whole pages cut out of the    ------> float32
    the client's Ogg stream            bytes --> sphn.OpusStreamReader       24 kHz (STT)

    response.audio.delta               OpusEncoder.encode(samples)
    base64 of whole Ogg pages <------  whole 960-sample frames       <------ float32
    of one stream per session          --> sphn.OpusStreamWriter             24 kHz (TTS)
                                       flush() at the end of a reply

What sphn (0.2.1) does, measured rather than assumed:

- ``OpusStreamWriter(24000).append_pcm`` takes any length, buffers internally and
  emits one Ogg page per 960-sample (40 ms) Opus packet; the OpusHead and OpusTags
  pages come out of the first call. It has no flush, so :class:`OpusEncoder` keeps
  the partial frame itself and only ever hands sphn whole frames.
- The OpusHead it writes declares a pre-skip of 3840 (80 ms at 48 kHz) although the
  real encoder delay is 156 samples (6.5 ms) at 24 kHz. ``OpusStreamReader`` ignores
  pre-skip, and so does the frontend's decoder (opus-recorder), so neither side
  applies it here either: n samples in give n samples out, 6.5 ms late.
- ``OpusStreamReader`` accepts pages without the header pages before them, and after
  bytes that are not an Ogg page it fails on every later call; this module therefore
  feeds it whole, checked pages only.
- Both calls hold the GIL for their whole duration and start no thread, so
  ``asyncio.to_thread`` would buy no parallelism. CPU time per 80 ms of audio on an
  AMD EPYC vCPU: about 2 ms to encode speech (0.5 ms for a pure tone; silence costs
  as much as speech) and 0.2 ms to decode it. One call is short enough for the event
  loop, but one process runs out of GIL at about 40 sessions speaking at once.

One encoder and one decoder per session, used from one task: neither is thread-safe.
"""

from __future__ import annotations

from typing import Final, Protocol

import numpy as np
import sphn  # no py.typed (setup.cfg lets mypy skip it); typed by the Protocols below

from .pcm import SAMPLE_RATE, Samples

# sphn's writer cuts 40 ms packets at 24 kHz; handing it whole ones keeps nothing
# hidden inside it, so flush() knows exactly what is left to pad.
FRAME_SAMPLES: Final = 960

_CAPTURE: Final = b"OggS"
_HEADER_BYTES: Final = 27  # fixed part of an Ogg page header, before the lacing values
_BOS: Final = 0x02  # header_type flag: first page of a logical stream
_EMPTY: Final[Samples] = np.zeros(0, dtype=np.float32)

_WHAT_TO_SEND: Final = (
    "send base64 of the consecutive bytes of one Ogg Opus stream (24 kHz mono, as "
    "Unmute's frontend records it), or set input_audio_format to 'pcm16' for raw PCM"
)
_LOOKS_LIKE: Final = (
    (b"RIFF", "a WAV file"),
    (b"\x1aE\xdf\xa3", "WebM/Matroska, as MediaRecorder produces in most browsers"),
    (b"ID3", "an MP3 file"),
    (b"fLaC", "a FLAC file"),
    (b"OpusHead", "a bare Opus header without its Ogg page"),
)


class _StreamReader(Protocol):
    def append_bytes(self, data: bytes, /) -> Samples: ...


class _StreamWriter(Protocol):
    def append_pcm(self, pcm: Samples, /) -> bytes: ...


def _new_reader() -> _StreamReader:
    reader: _StreamReader = sphn.OpusStreamReader(SAMPLE_RATE)
    return reader


def _new_writer() -> _StreamWriter:
    writer: _StreamWriter = sphn.OpusStreamWriter(SAMPLE_RATE)
    return writer


class OpusDecoder:
    """Turns the client's Ogg Opus stream, in slices of any size, into samples.

    Pages before the first beginning-of-stream page are dropped, as Unmute does: its
    frontend can send a few stale pages of the previous connection after reconnecting.
    A new beginning-of-stream page later on restarts the Opus decoder.
    """

    def __init__(self) -> None:
        self._reader = _new_reader()
        self._buffer = bytearray()
        self._offset = 0  # stream position of _buffer[0], for error messages
        self._started = False
        self._resyncing = False
        self.pages_skipped = 0

    def decode(self, data: bytes) -> Samples:
        """Take the next bytes of the stream; return the samples they completed.

        Returns an empty array while a page is still incomplete.

        Raises:
            ValueError: the bytes are not an Ogg Opus stream, or a page is damaged;
                the message says what was found and what to send. The decoder stays
                usable: the samples of this call are lost, and decoding resumes with
                the next well-formed page (pages left in this call's bytes come out
                of the next call).
        """
        self._buffer += data
        decoded: list[Samples] = []
        while (page := self._next_page()) is not None:
            samples = self._decode_page(page)
            if samples.size:
                decoded.append(samples)
        if not decoded:
            return _EMPTY
        return decoded[0] if len(decoded) == 1 else np.concatenate(decoded)

    def _next_page(self) -> bytes | None:
        buffer = self._buffer
        if self._resyncing:
            found = buffer.find(_CAPTURE)
            drop = found if found >= 0 else max(0, len(buffer) - len(_CAPTURE) + 1)
            del buffer[:drop]
            self._offset += drop
            if found < 0:
                return None
            self._resyncing = False
        head = bytes(buffer[: len(_CAPTURE)])
        if head != _CAPTURE[: len(head)]:
            raise self._lost_sync(self._no_page_message())
        if len(buffer) > 4 and buffer[4] != 0:
            raise self._lost_sync(
                f"input audio has an Ogg page of unsupported version {buffer[4]} at byte "
                f"{self._offset} of the stream; {_WHAT_TO_SEND}"
            )
        if len(buffer) < _HEADER_BYTES:
            return None
        lacing_end = _HEADER_BYTES + buffer[26]
        if len(buffer) < lacing_end:
            return None
        size = lacing_end + sum(buffer[_HEADER_BYTES:lacing_end])
        if len(buffer) < size:
            return None
        page = bytes(buffer[:size])
        del buffer[:size]
        self._offset += size
        return page

    def _lost_sync(self, message: str) -> ValueError:
        # Skip this byte and look for the next page on the following calls, so that
        # one bad slice costs only the audio around it.
        del self._buffer[:1]
        self._offset += 1
        self._resyncing = True
        return ValueError(message)

    def _no_page_message(self) -> str:
        found = bytes(self._buffer[:16])
        if self._offset == 0:
            kind = next((name for magic, name in _LOOKS_LIKE if found.startswith(magic)), None)
            seems = f" (it looks like {kind})" if kind else ""
            return (
                f"input audio is not an Ogg Opus stream: it starts with {found!r}{seems}, "
                f"not an Ogg page (b'OggS'); {_WHAT_TO_SEND}"
            )
        return (
            f"input audio lost Ogg page sync at byte {self._offset} of the stream: found "
            f"{found!r} where a page (b'OggS') should start; {_WHAT_TO_SEND}, with no byte "
            "missing, repeated or added"
        )

    def _decode_page(self, page: bytes) -> Samples:
        if page[5] & _BOS:
            self._start_stream(page)
        elif not self._started:
            self.pages_skipped += 1
            return _EMPTY
        try:
            return self._reader.append_bytes(page)
        except ValueError as exc:
            self._reader = _new_reader()
            raise ValueError(
                f"input audio has a damaged Ogg Opus page ending at byte {self._offset} "
                f"of the stream ({exc}); {_WHAT_TO_SEND}"
            ) from exc

    def _start_stream(self, page: bytes) -> None:
        self._started = False
        body = page[_HEADER_BYTES + page[26] :]
        if not body.startswith(b"OpusHead") or len(body) < 19:
            raise ValueError(
                f"input audio is an Ogg stream but not Opus: its first packet starts with "
                f"{body[:8]!r}, not b'OpusHead'; {_WHAT_TO_SEND}"
            )
        channels, mapping_family = body[9], body[18]
        if mapping_family != 0:
            raise ValueError(
                f"input audio is Ogg Opus with {channels} channels (channel mapping "
                f"family {mapping_family}); only mono or stereo is decoded: {_WHAT_TO_SEND}"
            )
        self._reader = _new_reader()
        self._started = True


class OpusEncoder:
    """Turns the character's samples into the pages of one Ogg Opus stream.

    The stream lasts the whole session, across replies: the frontend decodes a single
    stream, and only the first pages carry its headers. Each call returns whole
    pages, which is what the frontend's decoder needs in every response.audio.delta.
    """

    def __init__(self) -> None:
        self._writer = _new_writer()
        self._pending: Samples = _EMPTY

    @property
    def pending_samples(self) -> int:
        """Samples held back until a whole 960-sample frame is available."""
        return int(self._pending.size)

    def encode(self, samples: Samples) -> bytes:
        """Encode the next samples (float32, mono, 24 kHz, nominally in [-1, 1]).

        Returns the Ogg pages they completed, possibly none: up to 959 samples wait
        for the next call, or for flush() or drop_pending().

        Raises:
            ValueError: samples is not one-dimensional.
        """
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples (a 1-D array), got shape {samples.shape}")
        pending = np.concatenate((self._pending, samples.astype(np.float32, copy=False)))
        whole = pending.size - pending.size % FRAME_SAMPLES
        self._pending = pending[whole:].copy()
        if whole == 0:
            return b""
        return self._writer.append_pcm(np.ascontiguousarray(pending[:whole]))

    def flush(self) -> bytes:
        """Pad the held-back partial frame with silence and return its page.

        Call it at the end of a reply, so its last syllable is not held until the next
        one. The cost: up to 959 samples (under 40 ms) of silence added to the stream,
        and one more page (80-200 bytes). Returns b"" if nothing is held.
        """
        if self._pending.size == 0:
            return b""
        padded = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        padded[: self._pending.size] = self._pending
        self._pending = _EMPTY
        return self._writer.append_pcm(padded)

    def drop_pending(self) -> int:
        """Forget the held-back partial frame (for a cancelled reply); return its size."""
        dropped = int(self._pending.size)
        self._pending = _EMPTY
        return dropped
