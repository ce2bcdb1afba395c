"""Which speech-to-text and text-to-speech a server uses, and whether they answer.

    --stt / --tts URL      → KyutaiSTT / KyutaiTTS (moshi-server)
    --stt / --tts embedded → EmbeddedSTT / EmbeddedTTS (models shipped in packages)
    --stt / --tts none     → no audio input / text-only replies

``/v1/health`` asks ``probe``: a Kyutai server is up when its ``/api/build_info``
answers (what Unmute's health check asks too); an embedded backend is up when its
models loaded at start-up. A backend that is down is not replaced by anything: the
sessions that need it get ``backend_unavailable`` errors that say what to do.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from yarl import URL

from ..config import EMBEDDED, Config
from .embedded.stt import EmbeddedSTT
from .embedded.tts import EmbeddedTTS
from .errors import BackendUnavailable
from .kyutai.stt import KyutaiSTT
from .kyutai.tts import KyutaiTTS
from .speech import SpeechToText, TextToSpeech

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Probe:
    up: bool
    status: str


class SpeechBackends:
    def __init__(self, stt: SpeechToText | None, tts: TextToSpeech | None) -> None:
        self.stt = stt
        self.tts = tts
        self._failed: dict[str, str] = {}
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def for_config(cls, config: Config) -> SpeechBackends:
        stt: SpeechToText | None = None
        tts: TextToSpeech | None = None
        if config.stt == EMBEDDED:
            stt = EmbeddedSTT()
        elif config.stt is not None:
            stt = KyutaiSTT(config.stt, api_key=config.stt_api_key)
        if config.tts == EMBEDDED:
            tts = EmbeddedTTS()
        elif config.tts is not None:
            tts = KyutaiTTS(config.tts, api_key=config.tts_api_key)
        return cls(stt, tts)

    async def start(self) -> None:
        """Connect the clients and load the embedded models (both at once)."""
        self._http = aiohttp.ClientSession()
        await asyncio.gather(*(self._start(kind, backend) for kind, backend
                               in (("stt", self.stt), ("tts", self.tts))
                               if backend is not None))

    async def _start(self, kind: str, backend: SpeechToText | TextToSpeech) -> None:
        try:
            await backend.start()
        except BackendUnavailable as exc:
            self._failed[kind] = str(exc)
            log.error("%s unavailable: %s", backend.name, exc)

    async def close(self) -> None:
        for backend in (self.stt, self.tts):
            if backend is not None:
                await backend.close()
        if self._http is not None:
            await self._http.close()

    async def probe(self) -> tuple[Probe, Probe]:
        stt, tts = await asyncio.gather(self._probe("stt", self.stt),
                                        self._probe("tts", self.tts))
        return stt, tts

    async def _probe(self, kind: str, backend: SpeechToText | TextToSpeech | None) -> Probe:
        if backend is None:
            return Probe(False, f"missing: start the server with --{kind}")
        if kind in self._failed:
            return Probe(False, f"down: {self._failed[kind]}")
        if isinstance(backend, EmbeddedSTT | EmbeddedTTS):
            return Probe(True, f"embedded: {backend.name}")
        assert isinstance(backend, KyutaiSTT | KyutaiTTS) and self._http is not None
        url = URL(backend.url)
        info = url.with_scheme("https" if url.scheme == "wss" else "http").with_path(
            "/api/build_info")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), self._http.get(info) as response:
                if response.status == 200:
                    return Probe(True, f"live: {backend.name}")
                return Probe(False, f"down: {info} answered HTTP {response.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Probe(False, f"down: {info} did not answer "
                                f"({exc or type(exc).__name__})")
