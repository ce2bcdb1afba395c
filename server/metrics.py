"""Every Prometheus metric of the server (DESIGN.md §7), in one place.

Per-session series carry a ``session_id`` label and are removed by ``forget_session``
when the session ends, so cardinality stays bounded by the live sessions. The label's
value is the session's ordinal in this process (1, 2, 3, ...), never its id: /metrics
may be scraped by whoever reaches it, and an id must not be enumerable (the admin
route ``/v1/sessions`` shows which ordinal each session has). Every other label takes
its values from a closed set the server chooses: text that clients or character code
control goes through a mapping such as ``error_type_label`` first.
"""

from __future__ import annotations

import builtins
import itertools
import logging
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from sandbox import Observer

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.45, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)

CHARACTER_RELOAD_DURATION = Histogram(
    "character_reload_duration_seconds",
    "Time to load a character directory into a new sandbox and swap it in.",
    buckets=_FAST,
)
M = TypeVar("M", bound=MetricWrapperBase)
_ordinals: dict[str, str] = {}
_next_ordinal = itertools.count(1)


def session_label(session_id: str) -> str:
    """The ``session_id`` label value of a session: its ordinal in this process."""
    label = _ordinals.get(session_id)
    if label is None:
        label = _ordinals[session_id] = str(next(_next_ordinal))
    return label


class _PerSession(Generic[M]):
    """A metric with one series per live session, labelled by ``session_label``."""

    def __init__(self, metric: M) -> None:
        self.metric = metric

    def labels(self, session_id: str) -> M:
        child: M = self.metric.labels(session_label(session_id))
        return child

    def remove(self, session_id: str) -> None:
        """Raises ``KeyError`` when the session has no series here."""
        label = _ordinals.get(session_id)
        if label is None:
            raise KeyError(session_id)
        self.metric.remove(label)


SESSION_CHARACTER_COUNT = _PerSession(Gauge(
    "session_character_count", "Characters loaded in a session (session_id: the "
    "session's ordinal in this process).", ["session_id"]
))
CHARACTER_LOAD_PER_SESSION = _PerSession(Counter(
    "character_load_per_session", "Directory loads per session (session_id: the "
    "session's ordinal in this process).", ["session_id"]
))
CHARACTER_LOAD_ERRORS = Counter(
    "character_load_errors", "Character files that failed to load, by error type "
    "(see error_type_label).",
    ["error_type"],
)
SESSIONS = Counter("sessions", "WebSocket sessions opened.")
SESSIONS_ACTIVE = Gauge("sessions_active", "WebSocket sessions open now.")
SESSIONS_REJECTED = Counter("sessions_rejected", "Sessions refused because the server was full.")
HANDSHAKES_REFUSED = Counter(
    "handshakes_refused", "Requests the front door turned away, by code (auth.RefusalCode).",
    ["code"],
)
SESSIONS_EXPIRED = Counter(
    "sessions_expired", "Sessions closed at a deadline (idle or max_length).", ["deadline"]
)
SESSION_DURATION = Histogram(
    "session_duration_seconds", "How long sessions last.",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 14400),
)
SANDBOX_SPAWN_DURATION = Histogram(
    "sandbox_spawn_duration_seconds", "Time from asking for a sandbox child to its ready reply.",
    buckets=_FAST,
)
SANDBOX_SPAWN_FAILURES = Counter("sandbox_spawn_failures", "Sandbox children that failed to start.")
SANDBOX_CRASHES = Counter("sandbox_crashes", "Sandbox children that died during a call or load.")
SANDBOX_TIMEOUTS = Counter("sandbox_timeouts", "Sandbox calls or files that missed a deadline.")
SANDBOX_RPC_DURATION = Histogram(
    "sandbox_rpc_duration_seconds", "Sandbox requests, by method.", ["method"], buckets=_FAST
)
LLM_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds",
    "From asking the language model for a reply to its first text.", buckets=_LATENCY,
)
TTS_FIRST_AUDIO = Histogram(
    "tts_time_to_first_audio_seconds",
    "From the first text given to the text-to-speech to its first audio.", buckets=_LATENCY,
)
REPLY_FIRST_AUDIO = Histogram(
    "reply_time_to_first_audio_seconds",
    "From the start of a reply to its first audio sent to the client.", buckets=_LATENCY,
)
REPLY_DRAFTS = Counter(
    "reply_drafts", "Replies drafted at a pause (preemptive generation), by outcome: "
    "used (the turn ended with those words) or dropped.", ["outcome"],
)
WEBSOCKET_EVENTS = Counter(
    "websocket_events", "WebSocket events by type and direction.", ["type", "direction"]
)

SANDBOX_ERROR_TYPES = frozenset({
    # The sandbox's own verdicts on a file (DESIGN.md §3, sandbox/loader.py, child.py, host.py).
    "MissingAttribute", "InvalidAttribute", "MissingPromptGenerator", "InvalidVoiceSource",
    "InvalidMetadata", "InvalidTools", "MissingToolHandler", "DuplicateName", "ImportError",
    "SyntaxError", "Timeout", "Crashed", "OutputLimitExceeded", "MemoryLimitExceeded",
    "PackageError", "TooManyCharacters",
})
BUILTIN_ERROR_TYPES = frozenset(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)
OTHER_ERROR_TYPE = "other"


def error_type_label(error_type: str) -> str:
    """The ``error_type`` label for a file's error: the sandbox's own names and Python's
    built-in exception names as they are, anything else ``"other"``.

    ``error_type`` is often the class name of whatever the character code raised, so
    its author chooses it; passed through, random names would each make a series.
    """
    if error_type in SANDBOX_ERROR_TYPES or error_type in BUILTIN_ERROR_TYPES:
        return error_type
    return OTHER_ERROR_TYPE


def forget_session(session_id: str) -> None:
    """Drop every per-session series of ``session_id``, and its ordinal."""
    for metric in (SESSION_CHARACTER_COUNT, CHARACTER_LOAD_PER_SESSION):
        try:
            metric.remove(session_id)
        except KeyError:
            pass  # the session never loaded anything
    _ordinals.pop(session_id, None)


class MetricsObserver(Observer):
    """Feeds the sandbox's reports into the metrics above and the log."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def spawned(self, seconds: float) -> None:
        SANDBOX_SPAWN_DURATION.observe(seconds)

    def spawn_failed(self, error: BaseException) -> None:
        SANDBOX_SPAWN_FAILURES.inc()
        self._log.error("could not start a sandbox child: %s", error)

    def call(self, method: str, seconds: float) -> None:
        SANDBOX_RPC_DURATION.labels(method).observe(seconds)

    def crashed(self, label: str, reason: str) -> None:
        SANDBOX_CRASHES.inc()
        self._log.warning("%s: sandbox child died: %s", label, reason)

    def timed_out(self, label: str, what: str) -> None:
        SANDBOX_TIMEOUTS.inc()
        self._log.warning("%s: sandbox deadline missed: %s", label, what)

    def output(self, label: str, text: str) -> None:
        self._log.info("%s: character output: %s", label, text[:2000].rstrip())

