"""The front door with real clients on loopback (README "The front door"): the openai
SDK with a key and with a client secret, browser-style handshakes, keys used beyond
their scope, expired secrets, wrong keys, the admission limits, the SIGHUP reload of
the keys file, the idle timeout, the maximum session length, pings, /metrics and the
admin routes. Each test is written as the client being refused; the decisions
themselves are unit-tested in tests/test_auth.py.

    keys file: alice (root alice/, 1 session at most), bob (root bob/), ops (admin)
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp.test_utils import TestClient, TestServer
from conftest import SCALE, MakeServer, character_source, write_directory
from openai import AsyncOpenAI

from server.app import FRONT_DOOR, create_app
from server.config import Config, parse

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdefghij"
OPS = "sk-ops-0123456789abcdefghij"
CAROL = "sk-carol-0123456789abcdefgh"
WITHIN = 20.0 * SCALE
MODEL = "m"
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def keys_file(path: Path, tenants: Path, *, alice: bool = True, carol: bool = False) -> Path:
    entries = []
    if alice:
        entries.append(f'[[key]]\nname = "alice"\nsecret = "{ALICE}"\n'
                       f'allowed_roots = ["{tenants / "alice"}"]\nmax_sessions = 1\n')
    entries.append(f'[[key]]\nname = "bob"\nsecret = "{BOB}"\n'
                   f'allowed_roots = ["{tenants / "bob"}"]\n')
    entries.append(f'[[key]]\nname = "ops"\nsecret = "{OPS}"\nadmin = true\n')
    if carol:
        entries.append(f'[[key]]\nname = "carol"\nsecret = "{CAROL}"\n')
    path.write_text("\n".join(entries))
    path.chmod(0o600)
    return path


@pytest.fixture
def tenants(tmp_path: Path) -> Path:
    root = tmp_path / "tenants"
    for name in ("alice", "bob"):
        write_directory(root / name, "cast", {f"{name}.py": character_source(f"{name.title()}bot")})
    return root


@pytest.fixture
def keys(tmp_path: Path, tenants: Path) -> Path:
    return keys_file(tmp_path / "keys.toml", tenants)


@pytest.fixture
async def keyed(make_server: MakeServer, keys: Path) -> TestClient:
    return await make_server(api_keys=keys)


def realtime(model: str | None = MODEL) -> str:
    return "/v1/realtime" + (f"?model={model}" if model else "")


def sdk(server: TestClient, api_key: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=api_key, base_url=f"http://127.0.0.1:{server.port}/v1",
                       websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")


async def refusal(server: TestClient, path: str = "/v1/realtime?model=m",
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    """What a WebSocket handshake on ``path`` gets back when it is refused: status,
    the JSON error and the headers."""
    response = await server.get(path, headers={**UPGRADE, **(headers or {})})
    body = await response.json()
    return response.status, body["error"], response.headers


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=WITHIN)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    event: dict[str, Any] = json.loads(message.data)
    return event


async def request(ws: aiohttp.ClientWebSocketResponse, event: dict[str, Any]) -> dict[str, Any]:
    await ws.send_str(json.dumps(event))
    return await receive(ws)


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[Any]:
    """Every message up to the close (bounded)."""
    messages = []
    async with asyncio.timeout(WITHIN):
        while True:
            message = await ws.receive()
            messages.append(message)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return messages


async def eventually(check: Any, attempts: int = 300) -> bool:
    for _ in range(attempts):
        if await check():
            return True
        await asyncio.sleep(0.02 * SCALE)
    return False


# ── the openai SDK: a key, and a client secret ───────────────────────────────


async def test_the_openai_sdk_opens_a_session_with_a_key(keyed: TestClient) -> None:
    async with sdk(keyed, ALICE) as client, client.realtime.connect(model=MODEL) as connection:
        created = await asyncio.wait_for(connection.recv(), WITHIN)
        await connection.session.update(session={"type": "realtime", "instructions": "Hi."})
        updated = await asyncio.wait_for(connection.recv(), WITHIN)

    assert created.type == "session.created"
    assert updated.type == "session.updated"


@pytest.mark.parametrize(("api_key", "code"), [
    (BOB[:-1] + "x", "invalid_api_key"),
    ("ek_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "invalid_api_key"),
])
async def test_the_openai_sdk_with_a_wrong_key_is_refused_at_the_handshake(
    keyed: TestClient, api_key: str, code: str
) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with sdk(keyed, api_key) as client, client.realtime.connect(model=MODEL):
            pass

    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = json.loads(response.body)["error"]
    assert error["code"] == code
    assert "Authorization: Bearer" in error["message"] or "client_secrets" in error["message"]


async def test_the_openai_sdk_mints_a_client_secret_that_opens_sessions_in_its_keys_scope(
    keyed: TestClient, tenants: Path
) -> None:
    async with sdk(keyed, ALICE) as client:
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 60},
            session={"type": "realtime", "model": MODEL})
    assert secret.value.startswith("ek_") and ALICE not in secret.value
    assert 0 < secret.expires_at - time.time() <= 60
    assert secret.session.type == "realtime"

    async with (sdk(keyed, secret.value) as client,
                client.realtime.connect(model=MODEL) as connection):
        created = json.loads(await asyncio.wait_for(connection.recv_bytes(), WITHIN))
        await connection.send({"type": "session.characters.reload",  # type: ignore[arg-type]
                               "directory": str(tenants / "alice" / "cast")})
        own = json.loads(await asyncio.wait_for(connection.recv_bytes(), WITHIN))
        await connection.send({"type": "session.characters.reload",  # type: ignore[arg-type]
                               "directory": str(tenants / "bob" / "cast")})
        other = json.loads(await asyncio.wait_for(connection.recv_bytes(), WITHIN))

    assert created["type"] == "session.created"
    assert own["type"] == "session.characters.reloaded", own
    assert [c["name"] for c in own["characters"]] == ["Alicebot"]
    assert other["type"] == "error" and other["error"]["code"] == "directory_not_allowed"


@pytest.mark.parametrize(("body", "param"), [
    ({"expires_after": {"seconds": 9}}, "expires_after.seconds"),
    ({"expires_after": {"seconds": 7201}}, "expires_after.seconds"),
    ({"expires_after": {"seconds": "600"}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "now", "seconds": 60}}, "expires_after.anchor"),
    ({"session": {"type": "transcription"}}, "session.type"),
])
async def test_a_client_secret_request_out_of_bounds_is_refused(
    keyed: TestClient, body: dict[str, Any], param: str
) -> None:
    response = await keyed.post("/v1/realtime/client_secrets", json=body,
                                headers={"Authorization": f"Bearer {ALICE}"})

    assert response.status == 400
    assert (await response.json())["error"]["param"] == param


async def test_a_client_secret_needs_a_key_and_cannot_mint_another(keyed: TestClient) -> None:
    anonymous = await keyed.post("/v1/realtime/client_secrets", json={})
    minted = await keyed.post("/v1/realtime/client_secrets", json={},
                              headers={"Authorization": f"Bearer {BOB}"})
    value = (await minted.json())["value"]
    chained = await keyed.post("/v1/realtime/client_secrets", json={},
                               headers={"Authorization": f"Bearer {value}"})

    assert anonymous.status == 401
    assert (await anonymous.json())["error"]["code"] == "missing_api_key"
    assert minted.status == 200
    assert 590 <= (await minted.json())["expires_at"] - time.time() <= 600  # the default
    assert chained.status == 401


async def test_an_expired_client_secret_is_refused_saying_where_to_get_a_new_one(
    keyed: TestClient
) -> None:
    door = keyed.app[FRONT_DOOR]
    bob = door.keyring.find(BOB) if door.keyring is not None else None
    value, _ = door.secrets.mint(bob, 600, now=time.time() - 3600)  # minted an hour ago

    status, error, _ = await refusal(keyed, headers={"Authorization": f"Bearer {value}"})
    with pytest.raises(aiohttp.WSServerHandshakeError) as browser:
        await keyed.ws_connect("/v1/realtime?model=m",
                               protocols=("realtime", f"openai-insecure-api-key.{value}"))

    assert (status, error["code"]) == (401, "client_secret_expired")
    assert "POST /v1/realtime/client_secrets" in error["message"]
    assert browser.value.status == 401


# ── browsers: subprotocols and the Origin allowlist ──────────────────────────


async def browser_connect(server: TestClient, origin: str, credential: str
                          ) -> aiohttp.ClientWebSocketResponse:
    return await server.ws_connect(
        "/v1/realtime?model=m", headers={"Origin": origin},
        protocols=("realtime", f"openai-insecure-api-key.{credential}"))


async def test_a_browser_from_the_servers_own_origin_connects_with_a_secret(
    keyed: TestClient
) -> None:
    origin = f"http://127.0.0.1:{keyed.port}"
    minted = await keyed.post("/v1/realtime/client_secrets", json={}, headers={
        "Authorization": f"Bearer {BOB}", "Origin": origin})
    value = (await minted.json())["value"]

    ws = await browser_connect(keyed, origin, value)
    try:
        created = await receive(ws)
    finally:
        await ws.close()

    assert created["type"] == "session.created"
    assert ws.protocol == "realtime"  # never echoes the key's subprotocol


@pytest.mark.parametrize("origin", ["https://evil.example", "null",
                                    "http://127.0.0.1.evil.example"])
async def test_a_browser_from_another_origin_is_refused_even_with_a_good_key(
    keyed: TestClient, origin: str
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await browser_connect(keyed, origin, ALICE)
    status, error, _ = await refusal(keyed, headers={
        "Origin": origin, "Sec-WebSocket-Protocol": f"realtime, openai-insecure-api-key.{ALICE}"})
    minting = await keyed.post("/v1/realtime/client_secrets", json={}, headers={
        "Origin": origin, "Authorization": f"Bearer {ALICE}"})

    assert refused.value.status == status == minting.status == 403
    assert error["code"] == "origin_not_allowed"


async def test_an_allowed_origin_connects_and_the_loopback_default_goes(
    make_server: MakeServer, keys: Path
) -> None:
    server = await make_server(api_keys=keys, allowed_origins=("https://app.example",))

    ws = await browser_connect(server, "https://app.example", BOB)
    try:
        assert (await receive(ws))["type"] == "session.created"
    finally:
        await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await browser_connect(server, "http://localhost:3000", BOB)
    assert refused.value.status == 403


async def test_a_client_without_origin_is_judged_by_its_key_alone(keyed: TestClient) -> None:
    ws = await keyed.ws_connect("/v1/realtime?model=m", protocols=("realtime",),
                                headers={"Authorization": f"Bearer {BOB}"})
    try:
        assert (await receive(ws))["type"] == "session.created"
    finally:
        await ws.close()
    status, error, _ = await refusal(keyed)
    assert (status, error["code"]) == (401, "missing_api_key")


async def test_an_open_loopback_server_refuses_a_page_that_rebound_its_name(
    server: TestClient, connect_to: Any
) -> None:
    """No keys on loopback: open to local clients, but not to a web page whose DNS
    name now points at 127.0.0.1 (the browser calls that page's own origin)."""
    evil = f"evil.example:{server.port}"
    status, error, _ = await refusal(server, headers={"Host": evil,
                                                      "Origin": f"http://{evil}"})
    session = await connect_to(server, headers={"Authorization": "Bearer anything"})

    assert (status, error["code"]) == (403, "host_not_allowed")
    assert await session.names()


# ── a key beyond its scope ───────────────────────────────────────────────────


async def test_a_tenant_cannot_load_another_tenants_directory_or_the_servers_roots(
    make_server: MakeServer, keys: Path, tenants: Path, allowed_root: Path
) -> None:
    write_directory(allowed_root, "public", {"p.py": character_source("Publicbot")})
    server = await make_server(api_keys=keys)  # --allowed-root is for keyless sessions
    ws = await server.ws_connect(realtime(), headers={"Authorization": f"Bearer {BOB}"})
    try:
        await receive(ws)
        own = await request(ws, {"type": "session.characters.reload",
                                 "directory": str(tenants / "bob" / "cast")})
        others = [await request(ws, {"type": "session.characters.reload", "directory": d})
                  for d in (str(tenants / "alice" / "cast"),
                            str(tenants / "bob" / ".." / "alice" / "cast"),
                            str(allowed_root / "public"))]
        listed = await request(ws, {"type": "session.characters.list"})
    finally:
        await ws.close()

    assert own["type"] == "session.characters.reloaded"
    for refused in others:
        assert refused["type"] == "error" and refused["error"]["code"] == "directory_not_allowed"
        assert f"({tenants / 'bob'})" in refused["error"]["message"]  # its own roots only
    assert [c["name"] for c in listed["characters"]] == ["Bobbot"]


async def test_a_key_over_its_session_limit_gets_429_before_the_handshake(
    keyed: TestClient
) -> None:
    first = await keyed.ws_connect(realtime(), headers={"Authorization": f"Bearer {ALICE}"})
    await receive(first)

    status, error, headers = await refusal(keyed, headers={"Authorization": f"Bearer {ALICE}"})
    other = await keyed.ws_connect(realtime(), headers={"Authorization": f"Bearer {BOB}"})
    await other.close()
    await first.close()

    async def admitted_again() -> bool:
        try:
            ws = await keyed.ws_connect(realtime(),
                                        headers={"Authorization": f"Bearer {ALICE}"})
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 429
            return False
        await ws.close()
        return True

    assert (status, error["code"]) == (429, "too_many_sessions")
    assert headers["Retry-After"] == "5"
    assert await eventually(admitted_again)


async def test_handshakes_beyond_a_keys_rate_get_429(make_server: MakeServer, keys: Path) -> None:
    server = await make_server(api_keys=keys, handshake_rate_per_key=3)
    for _ in range(3):
        ws = await server.ws_connect(realtime(), headers={"Authorization": f"Bearer {BOB}"})
        await ws.close()

    status, error, headers = await refusal(server, headers={"Authorization": f"Bearer {BOB}"})

    assert (status, error["code"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1
    ws = await server.ws_connect(realtime(), headers={"Authorization": f"Bearer {OPS}"})
    await ws.close()


def _outside_address() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_handshakes_beyond_an_addresss_rate_get_429_whatever_the_key(
    aiohttp_client: Any, config: Config, keys: Path
) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("no address beside loopback to connect from")
    app = create_app(dataclasses.replace(config, api_keys=keys, handshake_rate_per_address=3))
    server: TestClient = await aiohttp_client(TestServer(app, host=address))
    url = f"ws://{address}:{server.port}/v1/realtime?model=m"
    async with aiohttp.ClientSession() as http:
        for credential in (BOB, "sk-guess-000000000000", OPS):
            try:
                ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {credential}"})
                await ws.close()
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as limited:
            await http.ws_connect(url, headers={"Authorization": f"Bearer {BOB}"})

    assert limited.value.status == 429
    assert limited.value.headers is not None and "Retry-After" in limited.value.headers


# ── the keys file re-read on SIGHUP ──────────────────────────────────────────


async def test_sighup_rereads_the_keys_file_and_live_sessions_go_on(
    server_process: Any, tmp_path: Path, tenants: Path
) -> None:
    path = keys_file(tmp_path / "keys.toml", tenants)
    url = await server_process(env={"TROUPE_API_KEYS": str(path)})
    ws_base = url.replace("http://", "ws://") + "/v1/realtime?model=m"
    async with aiohttp.ClientSession() as http:
        pid = (await (await http.get(f"{url}/v1/health")).json())["pid"]
        live = await http.ws_connect(ws_base, headers={"Authorization": f"Bearer {ALICE}"})
        await receive(live)

        async def handshake(key: str) -> int:
            response = await http.get(ws_base, headers={**UPGRADE,
                                                        "Authorization": f"Bearer {key}"})
            async with response:
                return response.status

        assert await handshake(CAROL) == 401
        keys_file(path, tenants, alice=False, carol=True)
        os.kill(pid, signal.SIGHUP)

        async def carol_admitted() -> bool:
            return await handshake(CAROL) == 101

        assert await eventually(carol_admitted)
        assert await handshake(ALICE) == 401  # removed: no new sessions
        listed = await request(live, {"type": "session.characters.list"})  # but this goes on
        assert listed["type"] == "session.characters.listed"

        path.write_text("[[key]]\nname = 'broken'\n")  # no secret: refused, nothing changes
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(0.2 * SCALE)
        assert await handshake(CAROL) == 101
        assert (await request(live, {"type": "session.characters.list"}))["type"] == (
            "session.characters.listed")
        await live.close()


# ── how long: idle, maximum length, dead peers ───────────────────────────────


async def test_an_idle_session_is_closed_with_1000_and_a_reason(
    make_server: MakeServer
) -> None:
    server = await make_server(idle_timeout=1.0)
    ws = await server.ws_connect(realtime(), protocols=("realtime",))
    await receive(ws)

    messages = await until_closed(ws)

    assert ws.close_code == 1000
    assert "idle for 1 s" in messages[-1].extra


async def test_a_client_that_keeps_talking_is_not_idle(make_server: MakeServer) -> None:
    server = await make_server(idle_timeout=1.0 * SCALE)
    ws = await server.ws_connect(realtime(), protocols=("realtime",))
    await receive(ws)
    try:
        for _ in range(12):  # 3 idle timeouts' worth, a frame every quarter of one
            await asyncio.sleep(0.25 * SCALE)
            answer = await request(ws, {"type": "session.characters.list"})
            assert answer["type"] == "session.characters.listed", answer
    finally:
        await ws.close()


async def test_a_session_past_its_maximum_length_gets_session_expired_then_a_close(
    make_server: MakeServer
) -> None:
    server = await make_server(max_session=1.0)
    ws = await server.ws_connect(realtime(), protocols=("realtime",))
    await receive(ws)

    messages = await until_closed(ws)

    events = [json.loads(m.data) for m in messages if m.type is aiohttp.WSMsgType.TEXT]
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "session_expired"
    assert "maximum length of 1 s" in events[-1]["error"]["message"]
    assert ws.close_code == 1000
    assert "session expired" in messages[-1].extra


async def test_a_peer_that_stops_answering_pings_is_dropped(make_server: MakeServer) -> None:
    server = await make_server(heartbeat=0.5 * SCALE)
    ws = await server.ws_connect(realtime(), protocols=("realtime",), autoping=False)

    messages = await until_closed(ws)

    assert aiohttp.WSMsgType.PING in [m.type for m in messages]
    assert ws.closed or messages[-1].type is not aiohttp.WSMsgType.TEXT


# ── /metrics and the admin routes ────────────────────────────────────────────


async def test_metrics_carry_no_session_id_and_can_sit_behind_a_key(
    make_server: MakeServer, keys: Path
) -> None:
    server = await make_server(api_keys=keys, metrics_key="the-metrics-key-0123")
    ws = await server.ws_connect(realtime(), headers={"Authorization": f"Bearer {BOB}"})
    session_id = (await receive(ws))["session"]["id"]
    await request(ws, {"type": "session.characters.list"})  # after the first load

    without = await server.get("/metrics")
    wrong = await server.get("/metrics", headers={"Authorization": f"Bearer {BOB}"})
    scraped = await server.get("/metrics",
                               headers={"Authorization": "Bearer the-metrics-key-0123"})
    text = await scraped.text()
    sessions = await (await server.get("/v1/sessions",
                                       headers={"Authorization": f"Bearer {OPS}"})).json()
    await ws.close()

    assert (without.status, wrong.status, scraped.status) == (401, 401, 200)
    assert session_id not in text and "sess_" not in text
    series = re.findall(r'^session_character_count\{session_id="([^"]+)"\}', text, re.M)
    assert series == [sessions[0]["metrics_label"]] and series[0].isdigit()
    assert sessions[0]["id"] == session_id and sessions[0]["key"] == "bob"


async def test_admin_routes_need_an_admin_key(keyed: TestClient) -> None:
    as_bob = {"Authorization": f"Bearer {BOB}"}
    as_ops = {"Authorization": f"Bearer {OPS}"}
    browser_login = {"Authorization": "Basic " + base64.b64encode(f"me:{OPS}".encode()).decode()}

    assert (await keyed.get("/v1/sessions")).status == 401
    assert (await keyed.get("/v1/sessions", headers=as_bob)).status == 403
    assert (await keyed.get("/v1/sessions", headers=as_ops)).status == 200
    assert (await keyed.post("/v1/characters/reload", headers=as_bob)).status == 403
    assert (await keyed.post("/v1/characters/reload", headers=as_ops)).status == 200
    page = await keyed.get("/admin")
    assert page.status == 401 and page.headers["WWW-Authenticate"].startswith("Basic")
    assert (await keyed.get("/admin", headers=as_bob)).status == 403
    for headers in (as_ops, browser_login):
        page = await keyed.get("/admin", headers=headers)
        assert page.status == 200 and "live sessions" in await page.text()


async def test_the_admin_token_still_works_beside_admin_keys(
    make_server: MakeServer, keys: Path
) -> None:
    server = await make_server(api_keys=keys, admin_token="the-admin-token")

    for token in ("the-admin-token", OPS):
        assert (await server.get("/v1/sessions",
                                 headers={"Authorization": f"Bearer {token}"})).status == 200
    # The admin token is not an API key: it opens no session.
    status, _, _ = await refusal(server, headers={"Authorization": "Bearer the-admin-token"})
    assert status == 401


# ── Unmute's frontend through a proxy, and logs ──────────────────────────────


async def test_unmutes_client_gets_in_with_the_key_its_proxy_adds(keyed: TestClient) -> None:
    """Unmute's frontend sends no key; its deployment's reverse proxy adds the header."""
    ws = await keyed.ws_connect(realtime(model=None), protocols=("realtime",),
                                headers={"Authorization": f"Bearer {BOB}"})
    try:
        listed = await request(ws, {"type": "session.characters.list"})
    finally:
        await ws.close()

    assert listed["type"] == "session.characters.listed"


async def test_no_key_or_secret_reaches_the_log(
    keyed: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    minted = await keyed.post("/v1/realtime/client_secrets", json={},
                              headers={"Authorization": f"Bearer {BOB}"})
    value = (await minted.json())["value"]
    wrong = "sk-wrong-0123456789abcdef"
    attempts = [
        {"headers": {"Authorization": f"Bearer {BOB}"}},
        {"headers": {"Authorization": f"Bearer {wrong}"}},
        {"headers": {"Authorization": wrong}},
        {"protocols": ("realtime", f"openai-insecure-api-key.{value}")},
        {"protocols": (f"openai-insecure-api-key.{ALICE}",)},  # without realtime
        {"protocols": ("realtime", f"openai-insecure-api-key.{wrong}"),
         "headers": {"Origin": "https://evil.example"}},
    ]
    for attempt in attempts:
        try:
            ws = await keyed.ws_connect(realtime(), **attempt)
            await receive(ws)
            await ws.close()
        except aiohttp.WSServerHandshakeError:
            pass
    await keyed.get("/v1/sessions", headers={"Authorization": f"Bearer {wrong}"})
    await keyed.get("/admin", headers={"Authorization": "Basic " + base64.b64encode(
        f"me:{wrong}".encode()).decode()})

    ours = [r for r in caplog.records
            if not r.name.startswith(("openai", "httpx", "httpcore", "websockets"))]
    assert any("refused" in r.getMessage() for r in ours)
    for record in ours:
        text = record.getMessage() + str(record.args) + str(record.exc_text)
        for secret in (BOB, ALICE, wrong, value, value[3:]):
            assert secret not in text, (record.name, text)


# ── start-up ─────────────────────────────────────────────────────────────────


def test_an_open_server_beyond_loopback_refuses_to_start(
    capsys: pytest.CaptureFixture[str], keys: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["--host", "0.0.0.0"], {})
    message = capsys.readouterr().err

    assert exited.value.code == 2
    assert "--api-keys" in message and "--no-auth" in message
    assert parse(["--host", "0.0.0.0", "--no-auth"], {}).no_auth
    assert parse(["--host", "0.0.0.0"], {"TROUPE_API_KEYS": str(keys)}).api_keys == keys
    with pytest.raises(ValueError, match="--no-auth"):
        create_app(Config(host="0.0.0.0"))


def test_a_bad_keys_file_or_a_key_on_the_command_line_stops_start_up(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text(f'[[key]]\nname = "x"\nsecret = "{ALICE}"\nsecret_sha256 = "{"0" * 64}"\n')
    for argv in (["--api-keys", str(bad)], ["--metrics-key", "m"],
                 ["--allowed-origin", "evil.example"]):
        with pytest.raises(SystemExit) as exited:
            parse(argv, {})
        message = capsys.readouterr().err
        assert exited.value.code == 2, argv
        assert ALICE not in message
    config = parse([], {"TROUPE_METRICS_KEY": "m",
                        "TROUPE_ALLOWED_ORIGINS": "https://a.example, https://b.example"})
    assert config.metrics_key == "m"
    assert config.allowed_origins == ("https://a.example", "https://b.example")


# ── the web client (server/static/client.js, run in node) ────────────────────

HARNESS = Path(__file__).resolve().parent / "webclient_harness.js"
CLIENT_JS = Path(__file__).resolve().parent.parent / "server" / "static" / "client.js"


async def run_page(server: TestClient, key: str) -> dict[str, Any]:
    """client.js run as the page at the server's own origin, typing ``key`` if asked."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    process = await asyncio.create_subprocess_exec(
        node, "--experimental-websocket", "--no-warnings", str(HARNESS), str(CLIENT_JS),
        f"http://127.0.0.1:{server.port}", key, str(int(WITHIN * 1000)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 2 * WITHIN)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if b"experimental-websocket" in stderr and b"bad option" in stderr:
        pytest.skip("this node has no WebSocket")
    assert process.returncode == 0, stderr.decode()
    page: dict[str, Any] = json.loads(stdout)
    return page


async def test_the_web_client_trades_the_typed_key_for_a_client_secret(
    keyed: TestClient,
) -> None:
    page = await run_page(keyed, BOB)

    assert page["outcome"] == "listed", page
    assert page["status"].startswith("connected · sess_")
    asked, traded = page["requests"]
    assert asked == {"url": "/v1/realtime/client_secrets", "authorization": None}  # 401
    assert traded == {"url": "/v1/realtime/client_secrets", "authorization": f"Bearer {BOB}"}
    [socket_] = page["sockets"]
    assert socket_["protocols"][0] == "realtime"
    assert socket_["protocols"][1].startswith("openai-insecure-api-key.ek_")
    assert BOB not in json.dumps(socket_)
    assert page["keyField"] == "" and page["keyFormHidden"]  # the key is gone from the page


async def test_the_web_client_needs_no_key_on_an_open_server(server: TestClient) -> None:
    page = await run_page(server, "unused")

    assert page["outcome"] == "listed", page
    assert [r["authorization"] for r in page["requests"]] == [None]
    assert page["keyFormHidden"]


async def test_the_web_client_says_when_a_typed_key_is_refused(keyed: TestClient) -> None:
    page = await run_page(keyed, "sk-wrong-0123456789abcdef")

    assert page["outcome"] == "error", page
    assert "not valid" in page["errors"][0]
    assert page["status"] == "this server needs an API key"  # and it asks again
    assert not page["keyFormHidden"] and page["sockets"] == []
