"""The front door's decisions without sockets (server/frontdoor/keys.py, server/frontdoor/auth.py,
server/frontdoor/deadlines.py): keys files, client secrets, origins, rates, admission, and the
order the checks run in. Clocks are passed in; nothing here waits."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from server.frontdoor import auth, keys
from server.frontdoor.auth import FrontDoor, Knock, Refused, Settings
from server.frontdoor.deadlines import Deadlines, Expiry
from server.frontdoor.keys import ApiKey, ClientSecrets, Keyring

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdefgh"
ADMIN = "sk-root-0123456789abcdef"


def write_keys(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(textwrap.dedent(text))
    return path


def keyring() -> Keyring:
    return Keyring((
        ApiKey("alice", keys.digest(ALICE), (Path("/srv/alice"),), max_sessions=2),
        ApiKey("bob", keys.digest(BOB), (Path("/srv/bob"),)),
        ApiKey("root", keys.digest(ADMIN), admin=True),
    ))


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def door(**settings: object) -> tuple[FrontDoor, Clock]:
    clock = Clock()
    fields: dict[str, object] = {"require_keys": True, "open_on_loopback": False}
    fields.update(settings)
    ring = keyring() if fields["require_keys"] else None
    return FrontDoor(Settings(**fields), ring, clock=clock, wall=clock), clock  # type: ignore[arg-type]


def refused(action: object) -> Refused:
    assert callable(action)
    with pytest.raises(Refused) as caught:
        action()
    return caught.value


# ── the keys file ────────────────────────────────────────────────────────────


def test_a_keys_file_gives_each_key_its_scope(tmp_path: Path) -> None:
    path = write_keys(tmp_path, f"""
        [[key]]
        name = "alice"
        secret = "{ALICE}"
        allowed_roots = ["/srv/characters/alice", "/srv/characters/shared/../alice2"]
        max_sessions = 20

        [[key]]
        name = "ops"
        secret_sha256 = "{hashlib.sha256(ADMIN.encode()).hexdigest()}"
        admin = true
        """)

    ring = keys.load(path)

    alice, ops = ring.find(ALICE), ring.find(ADMIN)
    assert alice is not None and ops is not None
    assert alice.name == "alice" and not alice.admin and alice.max_sessions == 20
    assert alice.allowed_roots == (Path("/srv/characters/alice").resolve(),
                                   Path("/srv/characters/alice2").resolve())
    assert ops.name == "ops" and ops.admin and ops.allowed_roots == ()
    assert ops.max_sessions is None
    assert ring.find(BOB) is None and ring.plaintext
    assert ALICE not in repr(ring)


@pytest.mark.parametrize(("body", "says"), [
    ("", "holds no [[key]]"),
    ('[[key]]\nname = "a"\n', "exactly one of secret and secret_sha256"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\nsecret_sha256 = "{"0" * 64}"\n',
     "exactly one of"),
    ('[[key]]\nname = "a"\nsecret = "short"\n', "at least 16"),
    ('[[key]]\nname = "a"\nsecret = "has spaces in it, 0123456789"\n', "letters, digits"),
    ('[[key]]\nname = "a"\nsecret = "ek_0123456789abcdefgh"\n', "not start with ek_"),
    ('[[key]]\nname = "a"\nsecret_sha256 = "xyz"\n', "64 hex digits"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\nallowed_roots = ["relative"]\n', "absolute"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\nmax_sessions = 0\n', "max_sessions"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\nadmin = "yes"\n', "true or false"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\nsceret = "x"\n', "unknown fields"),
    (f'[[key]]\nname = "a b"\nsecret = "{ALICE}"\n', "name must be"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\n[[key]]\nname = "a"\nsecret = "{BOB}"\n',
     "two keys are named"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}"\n[[key]]\nname = "b"\nsecret = "{ALICE}"\n',
     "same secret"),
    (f'[[key]]\nname = "a"\nsecret = "{ALICE}\n', "not valid TOML"),
    (f'secret = "{ALICE}"\n', "unknown top-level"),
])
def test_a_bad_keys_file_is_refused_without_repeating_a_secret(
    tmp_path: Path, body: str, says: str
) -> None:
    path = write_keys(tmp_path, body)

    with pytest.raises(keys.KeysFileError) as caught:
        keys.load(path)

    assert says in str(caught.value)
    assert str(path) in str(caught.value)
    for secret in (ALICE, BOB, "short", "ek_0123456789abcdefgh", "has spaces"):
        assert secret not in str(caught.value)


def test_a_missing_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(keys.KeysFileError, match="cannot read it"):
        keys.load(tmp_path / "nowhere.toml")


# ── client secrets ───────────────────────────────────────────────────────────


def test_a_client_secret_carries_its_key_until_it_expires() -> None:
    ring, secrets = keyring(), ClientSecrets()
    alice = ring.find(ALICE)
    value, expires_at = secrets.mint(alice, 600, now=1000.0)

    assert value.startswith("ek_") and ALICE not in value and "alice" not in value
    assert expires_at == 1600
    assert secrets.check(value, ring, now=1599.9) is alice
    with pytest.raises(keys.ExpiredClientSecret):
        secrets.check(value, ring, now=1600.0)


def test_a_client_secret_dies_with_its_key_and_cannot_be_forged() -> None:
    ring, secrets = keyring(), ClientSecrets()
    value, _ = secrets.mint(ring.find(ALICE), 600, now=1000.0)
    replaced = Keyring((ApiKey("alice", keys.digest(ALICE + "-new")), *ring.keys[1:]))
    tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")

    for bad, against in ((value, replaced), (value, Keyring(ring.keys[1:])),
                         (tampered, ring), ("ek_notbase64!!", ring), ("ek_", ring)):
        with pytest.raises(keys.InvalidClientSecret):
            secrets.check(bad, against, now=1001.0)
    with pytest.raises(keys.InvalidClientSecret):  # another process's signing key
        ClientSecrets().check(value, ring, now=1001.0)
    shared = b"k" * 32  # replicas sharing --client-secret-key accept each other's
    minted, _ = ClientSecrets(shared).mint(ring.find(BOB), 600, now=1000.0)
    assert ClientSecrets(shared).check(minted, ring, now=1001.0) == ring.find(BOB)


# ── origins and hosts ────────────────────────────────────────────────────────


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("app.localhost", True), ("127.0.0.1", True), ("127.5.5.5", True),
    ("[::1]", True), ("::1", True), ("0.0.0.0", False), ("192.0.2.7", False),
    ("localhost.evil.example", False), ("", False),
])
def test_loopback_names(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    (None, "troupe.example", True),  # an SDK or a script: the key decides
    ("null", "troupe.example", False),
    ("http://127.0.0.1:3000", "troupe.example", True),
    ("http://localhost:8000", "troupe.example", True),
    ("http://[::1]", "troupe.example", True),
    ("https://troupe.example", "troupe.example", True),  # its own page, TLS at a proxy
    ("https://troupe.example", "troupe.example:443", True),
    ("http://troupe.example:8000", "troupe.example:8000", True),
    ("http://troupe.example:8001", "troupe.example:8000", False),
    ("https://evil.example", "troupe.example", False),
    ("https://troupe.example.evil.example", "troupe.example", False),
    ("file://", "troupe.example", False),
    ("chrome-extension://abc", "troupe.example", False),
    ("https://evil.example", None, False),
])
def test_the_default_origins_are_the_servers_own_and_loopback(
    origin: str | None, host: str | None, allowed: bool
) -> None:
    assert auth.Origins.of(()).permit(origin, host) is allowed


def test_configured_origins_replace_loopback_but_keep_the_servers_own() -> None:
    origins = auth.Origins.of(("https://app.example", "http://studio.example:8080"))

    assert origins.permit("https://app.example", "troupe.example")
    assert origins.permit("https://APP.example:443", "troupe.example")
    assert origins.permit("http://studio.example:8080", "troupe.example")
    assert origins.permit("https://troupe.example", "troupe.example")
    assert not origins.permit("http://localhost:3000", "troupe.example")
    assert not origins.permit("http://studio.example", "troupe.example")
    anyone = auth.Origins.of(("*",))
    assert anyone.permit("https://whoever.example", "troupe.example")
    assert not anyone.permit("null", "troupe.example")


def test_malformed_allowed_origins_are_named() -> None:
    assert auth.check_origins(["https://ok.example", "*"]) is None
    problem = auth.check_origins(["https://ok.example/path"])
    assert problem is not None and "/path" in problem
    assert auth.check_origins(["app.example"]) is not None


# ── rates and admission ──────────────────────────────────────────────────────


def test_a_rate_allows_its_burst_then_says_how_long_to_wait() -> None:
    limit = auth.RateLimit(per_minute=6)

    assert [limit.take("a", 0.0) for _ in range(6)] == [0.0] * 6
    wait = limit.take("a", 0.0)
    assert wait == pytest.approx(10.0)
    assert limit.take("b", 0.0) == 0.0  # another name has its own bucket
    assert limit.take("a", 10.0) == 0.0  # one token back after 10 s
    assert limit.take("a", 10.0) > 0
    assert auth.RateLimit(per_minute=0).take("a", 0.0) == 0.0  # off


def test_a_rate_remembers_a_bounded_number_of_names() -> None:
    limit = auth.RateLimit(per_minute=60, max_tracked=100)

    for n in range(10_000):
        limit.take(f"10.0.{n // 256}.{n % 256}", float(n) / 1000)

    assert len(limit) <= 100


@pytest.mark.parametrize(("address", "bucket"), [
    ("127.0.0.1", None), ("::1", None), (None, None), ("not an address", None),
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
])
def test_addresses_are_limited_per_host(address: str | None, bucket: str | None) -> None:
    assert auth.address_bucket(address) == bucket


def test_admission_counts_the_server_and_each_key() -> None:
    admission = auth.Admission()
    alice = keyring().find(ALICE)
    assert alice is not None and alice.max_sessions == 2

    admission.admit(alice, limit=3)
    admission.admit(alice, limit=3)
    over_key = refused(lambda: admission.admit(alice, limit=3))
    admission.admit(None, limit=3)
    full = refused(lambda: admission.admit(None, limit=3))
    admission.release("alice")
    admission.admit(alice, limit=4)

    assert (over_key.status, over_key.code) == (429, "too_many_sessions")
    assert (full.status, full.code) == (503, "server_full")
    assert over_key.headers()["Retry-After"] == full.headers()["Retry-After"] == "5"
    assert admission.total == 3 and admission.per_key == {"alice": 2}


# ── the door, in order ───────────────────────────────────────────────────────


def test_an_open_loopback_server_needs_no_key_and_ignores_one() -> None:
    open_door, _ = door(require_keys=False, open_on_loopback=True, roots=(Path("/srv"),))

    for authorization in (None, "Bearer anything", "Bearer x"):
        entry = open_door.enter(Knock(authorization=authorization, host="127.0.0.1:8000"))
        assert entry.scope.key is None and entry.scope.allowed_roots == (Path("/srv"),)


def test_an_open_loopback_server_refuses_a_rebound_host_name() -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1: same origin to the
    browser, so only the Host header gives it away."""
    open_door, _ = door(require_keys=False, open_on_loopback=True)
    knock = Knock(origin="http://evil.example:8000", host="evil.example:8000")

    assert refused(lambda: open_door.enter(knock)).code == "host_not_allowed"
    assert refused(lambda: open_door.minter(knock)).code == "host_not_allowed"
    open_door.enter(Knock(origin="http://localhost:8000", host="localhost:8000"))


@pytest.mark.parametrize(("knock", "code"), [
    (Knock(), "missing_api_key"),
    (Knock(authorization=f"Bearer {ALICE}x"), "invalid_api_key"),
    (Knock(authorization=ALICE), "invalid_api_key"),
    (Knock(authorization=f"Basic {ALICE}"), "invalid_api_key"),
    (Knock(authorization=f"Bearer {ALICE} {ALICE}"), "invalid_api_key"),
    (Knock(subprotocols=("realtime", "openai-insecure-api-key.sk-nobody-0123456789")),
     "invalid_api_key"),
    (Knock(subprotocols=("realtime", "openai-insecure-api-key.")), "missing_api_key"),
    (Knock(subprotocols=(f"openai-insecure-api-key.{ALICE}",)), "invalid_subprotocol"),
    (Knock(authorization="Bearer ek_AAAA"), "invalid_api_key"),
    (Knock(origin="null", authorization=f"Bearer {ALICE}"), "origin_not_allowed"),
    (Knock(origin="https://evil.example", host="troupe.example",
           authorization=f"Bearer {ALICE}"), "origin_not_allowed"),
])
def test_a_handshake_without_a_good_key_is_refused_saying_what_to_send(
    knock: Knock, code: str
) -> None:
    keyed, _ = door()

    refusal = refused(lambda: keyed.enter(knock))

    assert refusal.code == code
    assert refusal.status == {"origin_not_allowed": 403, "invalid_subprotocol": 400}.get(code, 401)
    assert ALICE not in refusal.message and ALICE not in str(refusal.body())
    if refusal.status == 401:
        assert "Authorization: Bearer" in refusal.message or "client secret" in refusal.message
    assert keyed.admission.total == 0


def test_a_key_opens_sessions_with_its_own_scope() -> None:
    keyed, _ = door()

    by_header = keyed.enter(Knock(authorization=f"Bearer {ALICE}"))
    by_browser = keyed.enter(Knock(
        origin="http://localhost:8000", host="localhost:8000",
        subprotocols=("realtime", f"openai-insecure-api-key.{BOB}")))

    assert by_header.scope == auth.Scope("alice", (Path("/srv/alice"),), False, "key")
    assert by_browser.scope == auth.Scope("bob", (Path("/srv/bob"),), False, "key")
    assert keyed.admission.per_key == {"alice": 1, "bob": 1}
    keyed.leave(by_header)
    assert keyed.admission.per_key == {"bob": 1}


def test_a_client_secret_opens_sessions_until_it_expires() -> None:
    keyed, clock = door()
    key = keyed.minter(Knock(authorization=f"Bearer {ALICE}"))
    value, expires_at = keyed.mint(key, 600)

    entry = keyed.enter(Knock(subprotocols=("realtime", f"openai-insecure-api-key.{value}")))
    assert entry.scope == auth.Scope("alice", (Path("/srv/alice"),), False, "client_secret")
    assert keyed.enter(Knock(authorization=f"Bearer {value}")).scope.key == "alice"

    clock.now = expires_at
    expired = refused(lambda: keyed.enter(Knock(authorization=f"Bearer {value}")))
    assert (expired.status, expired.code) == (401, "client_secret_expired")
    assert "POST /v1/realtime/client_secrets" in expired.message
    again = refused(lambda: keyed.minter(Knock(authorization=f"Bearer {value}")))
    assert again.code == "invalid_api_key"  # a secret cannot mint another


def test_a_reload_of_the_keys_voids_a_removed_key_and_its_secrets() -> None:
    keyed, _ = door()
    value, _ = keyed.mint(keyed.minter(Knock(authorization=f"Bearer {BOB}")), 600)

    keyed.replace_keys(Keyring(keyring().keys[:1] + keyring().keys[2:]))

    for credential in (BOB, value):
        refusal = refused(lambda c=credential: keyed.enter(Knock(authorization=f"Bearer {c}")))
        assert refusal.code == "invalid_api_key"
    keyed.enter(Knock(authorization=f"Bearer {ALICE}"))


def test_handshakes_are_rate_limited_per_key() -> None:
    keyed, clock = door(per_key_per_minute=3, per_address_per_minute=0)
    alice = Knock(authorization=f"Bearer {ALICE}", address="192.0.2.7")
    for _ in range(3):
        keyed.leave(keyed.enter(alice))

    over = refused(lambda: keyed.enter(alice))
    clock.now += 20
    keyed.leave(keyed.enter(alice))

    assert (over.status, over.code) == (429, "rate_limited") and "key 'alice'" in over.message
    assert int(over.headers()["Retry-After"]) == 20
    keyed.leave(keyed.enter(Knock(authorization=f"Bearer {BOB}", address="192.0.2.7")))


def test_handshakes_are_rate_limited_per_address_beyond_loopback() -> None:
    keyed, _ = door(per_key_per_minute=0, per_address_per_minute=5)
    for _ in range(5):
        keyed.leave(keyed.enter(Knock(authorization=f"Bearer {BOB}", address="192.0.2.7")))

    # Counted before the key is looked at: guessing keys from one address is limited too.
    flood = refused(lambda: keyed.enter(Knock(authorization="Bearer wrong-key-000000000",
                                              address="192.0.2.7")))

    assert (flood.code, "this address" in flood.message) == ("rate_limited", True)
    keyed.leave(keyed.enter(Knock(authorization=f"Bearer {BOB}", address="192.0.2.8")))
    for _ in range(10):  # loopback peers are not limited by address
        keyed.leave(keyed.enter(Knock(authorization=f"Bearer {ADMIN}", address="127.0.0.1")))


def test_the_limits_refuse_before_the_handshake() -> None:
    keyed, _ = door(max_sessions=3)
    alice = Knock(authorization=f"Bearer {ALICE}")
    keyed.enter(alice)
    keyed.enter(alice)

    assert refused(lambda: keyed.enter(alice)).status == 429
    keyed.enter(Knock(authorization=f"Bearer {BOB}"))
    assert refused(lambda: keyed.enter(Knock(authorization=f"Bearer {BOB}"))).status == 503


# ── admin and metrics ────────────────────────────────────────────────────────


def test_admin_routes_take_an_admin_key_or_the_admin_token() -> None:
    keyed, _ = door(admin_token="the-admin-token")
    value, _ = keyed.mint(keyed.minter(Knock(authorization=f"Bearer {ADMIN}")), 600)

    assert keyed.admin(ADMIN) == "root"
    assert keyed.admin("the-admin-token") == "admin token"
    assert refused(lambda: keyed.admin(ALICE)).status == 403
    assert refused(lambda: keyed.admin(None)).status == 401
    assert refused(lambda: keyed.admin("wrong")).status == 401
    assert refused(lambda: keyed.admin(value)).status == 401  # secrets open sessions only
    open_door, _ = door(require_keys=False)
    assert refused(lambda: open_door.admin("anything")).status == 404
    tokened, _ = door(require_keys=False, admin_token="t")
    assert tokened.admin("t") == "admin token"


def test_metrics_are_open_unless_a_metrics_key_is_set() -> None:
    open_door, _ = door(require_keys=False)
    open_door.metrics(None)
    keyed, _ = door(metrics_key="the-metrics-key")

    keyed.metrics("the-metrics-key")
    keyed.metrics(ADMIN)
    assert refused(lambda: keyed.metrics(None)).status == 401
    assert refused(lambda: keyed.metrics(ALICE)).status == 401


@pytest.mark.parametrize(("host", "has_keys", "no_auth", "problem"), [
    ("127.0.0.1", False, False, None),
    ("localhost", False, False, None),
    ("0.0.0.0", True, False, None),
    ("0.0.0.0", False, True, None),
    ("0.0.0.0", False, False, "--no-auth"),
    ("192.0.2.2", False, False, "--api-keys"),
    ("127.0.0.1", True, True, "contradict"),
])
def test_start_up_refuses_an_open_server_beyond_loopback(
    host: str, has_keys: bool, no_auth: bool, problem: str | None
) -> None:
    found = auth.startup_problem(host=host, keys=has_keys, no_auth=no_auth)

    assert found is None if problem is None else (found is not None and problem in found)


# ── deadlines ────────────────────────────────────────────────────────────────


def test_deadlines_say_what_expired_or_when_to_look_again() -> None:
    both = Deadlines(idle=60, max_length=3600)

    assert both.due(started=0, last_heard=0, now=10) == (None, 50)
    assert both.due(started=0, last_heard=3590, now=3595) == (None, 5)
    assert both.due(started=0, last_heard=0, now=60) == (Expiry.IDLE, 0)
    assert both.due(started=0, last_heard=3599, now=3600) == (Expiry.MAX_LENGTH, 0)
    assert Deadlines(None, None).due(0, 0, 1e9) == (None, float("inf"))
    assert Deadlines(None, 10).due(0, 0, 5) == (None, 5)
