"""Which language model a server uses, chosen by configuration, and its status.

    --llm URL       → OpenAICompatibleLLM (model from --llm-model, or the only one served)
    --llm embedded  → EmbeddedLLM: SmolLM2-135M in llama.cpp, demo quality (the default)
    --llm none      → BuiltinResponder, which says plainly that it is not a model

A configured endpoint that is down at start-up is not replaced by the built-in
responder: replies fail with ``backend_unavailable`` until it answers, and
``/v1/health`` says ``down``. The same goes for an embedded model that cannot load
(llama-cpp-python not installed): replies say so and how to fix it.
"""

from __future__ import annotations

import logging

from ..config import EMBEDDED, Config
from .builtin.responder import BuiltinResponder
from .embedded.llm import EmbeddedLLM
from .errors import BackendUnavailable
from .llm import LLM
from .openai.chat import OpenAICompatibleLLM

log = logging.getLogger(__name__)


class Backend:
    def __init__(self, llm: LLM, remote: OpenAICompatibleLLM | None) -> None:
        self.llm = llm
        self._remote = remote
        self._down: str | None = None

    @classmethod
    def for_config(cls, config: Config) -> Backend:
        if config.llm is None:
            return cls(BuiltinResponder(), None)
        if config.llm == EMBEDDED:
            return cls(EmbeddedLLM(), None)
        remote = OpenAICompatibleLLM(
            config.llm, api_key=config.llm_api_key or "unused", model=config.llm_model
        )
        return cls(remote, remote)

    async def start(self) -> None:
        if isinstance(self.llm, EmbeddedLLM):
            try:
                await self.llm.start()
            except BackendUnavailable as exc:
                self._down = str(exc)
                log.error("embedded language model unavailable: %s", exc)
            return
        if self._remote is None:
            log.warning("--llm none: characters answer through the built-in "
                        "responder, which only repeats what it heard")
            return
        try:
            await self._remote.start()
        except BackendUnavailable as exc:
            self._down = str(exc)
            log.error("language model unavailable: %s", exc)

    @property
    def up(self) -> bool:
        """A configured model that has answered (it is picked lazily if it was down),
        or an embedded one that loaded."""
        if isinstance(self.llm, EmbeddedLLM):
            return self._down is None
        return self._remote is not None and self._remote.model is not None

    @property
    def status(self) -> str:
        if isinstance(self.llm, EmbeddedLLM):
            return f"down: {self._down}" if self._down else f"embedded: {self.llm.name}"
        if self._remote is None:
            return "builtin"
        if self.up:
            return f"live: {self._remote.name}"
        return f"down: {self._down or 'not reached yet'}"

    async def close(self) -> None:
        await self.llm.close()  # the remote client, or the embedded model's worker
