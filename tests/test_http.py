"""The HTTP side (DESIGN.md §6, §7): health, voices, the deprecated server-wide reload,
metrics, the admin session list, the session cap, and the configuration."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import SCALE, Connect, MakeServer, character_source, free_port, write_directory

from server.config import Config, parse
from tests.fakes.kyutai_stt import FakeKyutaiSTT

SESSION_SERIES = re.compile(r'^session_character_count\{session_id="([^"]+)"\} (\S+)$', re.M)


async def get_json(client: TestClient, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.get(path, **kwargs)
    return response.status, await response.json()


async def voice_names(client: TestClient) -> set[str]:
    status, voices = await get_json(client, "/v1/voices")
    assert status == 200
    return {voice["name"] for voice in voices}


async def metrics(client: TestClient) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


async def eventually(condition: Any, attempts: int = 200) -> bool:
    """Poll an async ``condition`` until it holds, a bounded number of times."""
    for _ in range(attempts):
        if await condition():
            return True
        await asyncio.sleep(0.01 * SCALE)
    return False


# ── health and voices ────────────────────────────────────────────────────────


async def test_health_has_the_keys_unmute_clients_read(server: TestClient) -> None:
    status, health = await get_json(server, "/v1/health")

    assert status == 200
    assert health["ok"] is True
    for key in ("stt_up", "llm_up", "tts_up", "voice_cloning_up"):
        assert isinstance(health[key], bool), key


async def test_health_asks_the_speech_servers_whether_they_answer(
    fake_kyutai_stt: FakeKyutaiSTT, make_server: MakeServer,
) -> None:
    dead = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    server = await make_server(stt=fake_kyutai_stt.url, tts=dead)

    status, health = await get_json(server, "/v1/health")

    assert status == 200  # the sandbox is fine; speech is reported, not fatal
    assert health["stt_up"] is True
    assert health["backends"]["stt"].startswith("live: ")
    assert health["tts_up"] is False
    assert health["backends"]["tts"].startswith("down: ")
    assert "build_info" in health["backends"]["tts"]


async def test_health_names_a_missing_backend_and_the_option_to_set(server: TestClient) -> None:
    _, health = await get_json(server, "/v1/health")

    assert health["stt_up"] is False
    assert health["backends"]["stt"] == "missing: start the server with --stt"
    assert health["backends"]["llm"] == "builtin"


async def test_voices_lists_only_good_characters_in_unmutes_shape(
    server: TestClient, connect: Connect
) -> None:
    listed = await (await connect()).request({"type": "session.characters.list"})
    good = {c["name"] for c in listed["characters"] if c["good"] is True}

    status, voices = await get_json(server, "/v1/voices")

    assert status == 200
    assert "Captain Tuesday" in {c["name"] for c in listed["characters"]}
    assert "Captain Tuesday" not in good
    assert {voice["name"] for voice in voices} == good
    for voice in voices:
        assert set(voice) == {"name", "comment", "good", "source"}
        assert voice["good"] is True
        assert isinstance(voice["source"]["source_type"], str)


# ── the deprecated server-wide reload ────────────────────────────────────────


async def test_http_reload_changes_voices_but_not_live_sessions(
    make_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    directory = write_directory(tmp_path, "server-wide", {"anne.py": character_source("Anne")})
    client = await make_server(characters_dir=directory, admin_token="t")
    session = await connect(on=client)
    assert await session.names() == ["Anne"]
    assert await voice_names(client) == {"Anne"}

    write_directory(tmp_path, "server-wide", {
        "anne.py": character_source("Anne Marie"),
        "bruno.py": character_source("Bruno"),
    })
    refused = await client.post("/v1/characters/reload")
    response = await client.post("/v1/characters/reload", headers={"Authorization": "Bearer t"})

    assert refused.status == 401  # an admin route (README "The front door")
    assert response.status == 200
    assert "Deprecation" in response.headers
    assert (await response.json())["loaded_count"] == 2
    assert await voice_names(client) == {"Anne Marie", "Bruno"}
    assert await session.names() == ["Anne"]


# ── metrics ──────────────────────────────────────────────────────────────────


async def test_metrics_keep_a_series_per_live_session_only(
    server: TestClient, connect: Connect
) -> None:
    session = await connect()
    names = await session.names()  # answered after the session's first load

    text = await metrics(server)

    assert "character_reload_duration_seconds" in text
    series = SESSION_SERIES.findall(text)
    assert len(series) == 1, series
    assert float(series[0][1]) == len(names)

    await session.ws.close()

    async def no_session_series() -> bool:
        return "session_id=" not in await metrics(server)

    assert await eventually(no_session_series), await metrics(server)


# ── the admin session list ───────────────────────────────────────────────────


async def test_session_list_is_off_without_an_admin_token(server: TestClient) -> None:
    response = await server.get("/v1/sessions", headers={"Authorization": "Bearer t"})

    assert response.status == 404


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-token"),
    pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
    pytest.param({"Authorization": "t"}, id="bare-token"),
    pytest.param({"Authorization": "Basic t"}, id="other-scheme"),
    pytest.param({"Authorization": "Bearer t t"}, id="token-and-more"),
])
async def test_session_list_refuses_a_wrong_token(
    make_server: MakeServer, headers: dict[str, str]
) -> None:
    client = await make_server(admin_token="t")

    response = await client.get("/v1/sessions", headers=headers)

    assert response.status == 401


async def test_session_list_shows_live_sessions_with_their_sandbox(
    make_server: MakeServer, connect: Connect
) -> None:
    client = await make_server(admin_token="t")
    session = await connect(on=client)
    names = await session.names()

    status, sessions = await get_json(client, "/v1/sessions",
                                      headers={"Authorization": "Bearer t"})

    assert status == 200
    assert len(sessions) == 1
    assert sessions[0]["characters"] == names
    pid = sessions[0]["sandbox_pid"]
    assert isinstance(pid, int)
    os.kill(pid, 0)  # a live process: raises ProcessLookupError otherwise


# ── the session cap ──────────────────────────────────────────────────────────


async def test_a_full_server_refuses_new_connections_before_the_handshake(
    make_server: MakeServer, connect: Connect
) -> None:
    client = await make_server(max_sessions=1)
    first = await connect(on=client)
    names = await first.names()

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/realtime?model=m", protocols=("realtime",))
    response = await client.get("/v1/realtime?model=m", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})

    assert refused.value.status == 503  # a load balancer sees it; nothing was accepted
    assert refused.value.headers is not None and refused.value.headers["Retry-After"] == "5"
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "server_full"
    assert await first.names() == names


# ── configuration ────────────────────────────────────────────────────────────


def help_blocks(text: str) -> dict[str, str]:
    """Each option of ``--help`` output → its help text, whitespace collapsed."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            current = blocks.setdefault(option, [])
            current.append(line)
        elif line.startswith("   ") and current is not None:
            current.append(line)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in blocks.items()}


def test_help_documents_every_option_with_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["--help"], {})
    blocks = help_blocks(capsys.readouterr().out)

    assert exited.value.code == 0
    for option, text in blocks.items():
        if option not in ("-h", "--help"):
            assert "env TROUPE_" in text, (option, text)
    for field in dataclasses.fields(Config):
        if field.name == "sandbox":
            continue
        repeatable = {"allowed_roots": "--allowed-root", "allowed_origins": "--allowed-origin",
                      "trusted_proxies": "--trusted-proxy"}
        option = repeatable.get(field.name, "--" + field.name.replace("_", "-"))
        if field.name in SECRETS:
            assert option not in blocks, option
            option += "-file"
        assert option in blocks, option
        assert f"TROUPE_{field.name.upper()}" in blocks[option], blocks[option]
    for option in ("--call-timeout", "--load-timeout", "--file-timeout",
                   "--sandbox-pool-size", "--sandbox-memory-mb"):
        assert option in blocks, option


ENVIRONMENT = {"TROUPE_PORT": "9000", "TROUPE_ALLOWED_ROOTS": "/a:/b"}
SECRETS = ("admin_token", "llm_api_key", "tts_api_key", "stt_api_key", "metrics_key",
           "client_secret_key")


def test_configuration_comes_from_the_environment() -> None:
    config = parse([], ENVIRONMENT)

    assert config.port == 9000
    assert config.allowed_roots == (Path("/a"), Path("/b"))


def test_the_command_line_wins_over_the_environment() -> None:
    config = parse(["--port", "9100", "--allowed-root", "/c"], ENVIRONMENT)

    assert config.port == 9100
    assert config.allowed_roots == (Path("/c"),)


def test_backends_default_to_the_embedded_models_and_none_turns_them_off() -> None:
    assert parse([], {}).stt == parse([], {}).tts == parse([], {}).llm == "embedded"

    config = parse(["--stt", "none", "--llm", "http://127.0.0.1:11434/v1"], {"TROUPE_TTS": "off"})

    assert config.stt is None and config.tts is None
    assert config.llm == "http://127.0.0.1:11434/v1"


# ── secrets: from the environment or a file, never the command line ──────────


def variable(secret: str) -> str:
    return "TROUPE_" + secret.upper()


def option(secret: str) -> str:
    return "--" + secret.replace("_", "-")


def refused(argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``parse`` says on stderr as it exits with status 2."""
    with pytest.raises(SystemExit) as exited:
        parse(argv, environ)
    assert exited.value.code == 2
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("form", ["separate", "equals", "bare"])
def test_a_secret_on_the_command_line_is_refused_with_where_it_goes(
    capsys: pytest.CaptureFixture[str], secret: str, form: str
) -> None:
    argv = {"separate": [option(secret), "hunter2"], "equals": [f"{option(secret)}=hunter2"],
            "bare": [option(secret)]}[form]

    message = refused(argv, {}, capsys)

    assert f"{option(secret)} is not accepted" in message
    assert variable(secret) in message
    assert f"{option(secret)}-file" in message
    assert "hunter2" not in message


def test_secrets_come_from_the_environment() -> None:
    config = parse([], {variable(secret): f"{secret}-value" for secret in SECRETS})

    for secret in SECRETS:
        assert getattr(config, secret) == f"{secret}-value"


@pytest.mark.parametrize("secret", SECRETS)
def test_secrets_come_from_a_file_named_by_option_or_environment(
    tmp_path: Path, secret: str
) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret value \n\n")

    by_option = parse([f"{option(secret)}-file", str(path)], {})
    by_variable = parse([], {f"{variable(secret)}_FILE": str(path)})

    assert getattr(by_option, secret) == getattr(by_variable, secret) == "s3cret value"


def test_the_file_option_wins_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")

    config = parse(["--admin-token-file", str(path)], {"TROUPE_ADMIN_TOKEN": "from-env"})

    assert config.admin_token == "from-file"


def test_unset_secrets_keep_their_defaults() -> None:
    config = parse([], {})

    assert config.admin_token is None and config.llm_api_key is None
    assert config.tts_api_key == config.stt_api_key == "public_token"


def unreadable(path: Path) -> Path:
    path.write_text("token\n")
    path.chmod(0)
    return path


def blank(path: Path) -> Path:
    path.write_text(" \n\n")
    return path


def binary(path: Path) -> Path:
    path.write_bytes(b"\xff\xfe")
    return path


@pytest.mark.parametrize(("make", "says"), [
    pytest.param(lambda path: path, "cannot read it", id="missing"),
    pytest.param(lambda path: path.parent, "cannot read it", id="directory"),
    pytest.param(blank, "is empty", id="empty"),
    pytest.param(binary, "not UTF-8", id="binary"),
])
@pytest.mark.parametrize("through", ["option", "environment"])
def test_a_secret_file_that_gives_no_secret_stops_start_up(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: Any, says: str, through: str
) -> None:
    path = make(tmp_path / "admin-token")
    argv, environ = (["--admin-token-file", str(path)], {}) if through == "option" else (
        [], {"TROUPE_ADMIN_TOKEN_FILE": str(path)})

    message = refused(argv, environ, capsys)

    assert str(path) in message
    assert says in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_secret_file_stops_start_up(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = unreadable(tmp_path / "admin-token")

    message = refused(["--admin-token-file", str(path)], {}, capsys)

    assert "cannot read it" in message
    assert "TROUPE_ADMIN_TOKEN" in message


@pytest.mark.parametrize("environ", [
    pytest.param({"TROUPE_ADMIN_TOKEN": ""}, id="empty-variable"),
    pytest.param({"TROUPE_ADMIN_TOKEN": "a", "TROUPE_ADMIN_TOKEN_FILE": "/f"}, id="both"),
])
def test_an_ambiguous_or_empty_secret_variable_stops_start_up(
    capsys: pytest.CaptureFixture[str], environ: dict[str, str]
) -> None:
    message = refused([], environ, capsys)

    assert "TROUPE_ADMIN_TOKEN" in message


def test_secrets_stay_out_of_the_configurations_repr() -> None:
    config = parse([], {variable(secret): f"hidden-{secret}" for secret in SECRETS})

    assert "hidden-" not in repr(config)
