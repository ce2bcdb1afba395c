"""``GET /v1/voices`` as Unmute's own clients read it, with the shipped characters
(DESIGN.md §6).

    /v1/voices ──▶ each entry validated by Unmute's ``VoiceSample`` (extra fields
                   forbidden, ``source`` a file or freesound source)
               ──▶ ``source.path_on_server`` (the frontend's id for the voice)
                   sent back as ``voice`` in ``session.update`` ──▶ that character
                   greets, spoken with the voice its file names

The models below are written out from Unmute's definitions (``unmute/tts/voices.py``
and ``unmute/tts/freesound_download.py``, which ``unmute/loadtest/loadtest_client.py``
validates ``/v1/voices`` with), where they differ taking the stricter reading: extra
fields forbidden in the sources too, and a freesound source's ``path_on_server`` and
``sound_instance`` as the frontend needs them (it uses the path as the voice's id and
credits ``sound_instance.username``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp.test_utils import TestClient
from conftest import REPO, MakeServer
from pydantic import BaseModel, ConfigDict, Field
from test_unmute import INSTRUCTIONS, Unmute

from server.app import VOICES
from server.realtime import dialects
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import FakeOpenAI, text

SHIPPED = [REPO / "characters"]
"""Every character directory the repository ships."""


# ── Unmute's models ──────────────────────────────────────────────────────────


class FileVoiceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_type: Literal["file"]
    path_on_server: str
    description: str | None = None
    description_link: str | None = None


class FreesoundSoundInstance(BaseModel):
    id: int
    name: str
    username: str
    license: str


class FreesoundVoiceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_type: Literal["freesound"]
    url: str
    start_time: int | None = None
    sound_instance: FreesoundSoundInstance | None = None
    path_on_server: str


class VoiceSample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    comment: str | None = None
    good: bool | None = None
    instructions: dict[str, Any] | None = None
    source: FileVoiceSource | FreesoundVoiceSource = Field(discriminator="source_type")


def shipped_id(directory: Path) -> str:
    return directory.name


async def voices_of(server: TestClient) -> list[dict[str, Any]]:
    response = await server.get("/v1/voices")
    assert response.status == 200
    voices: list[dict[str, Any]] = await response.json()
    return voices


# ── the list ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("directory", SHIPPED, ids=shipped_id)
async def test_every_voice_validates_as_unmutes_voice_sample(
    make_server: MakeServer, directory: Path,
) -> None:
    server = await make_server(characters_dir=directory)

    voices = await voices_of(server)

    assert voices
    for voice in voices:
        assert set(voice) == {"name", "comment", "good", "source"}
        sample = VoiceSample.model_validate(voice)
        assert sample.source.path_on_server, voice  # the frontend's id for the voice
    paths = [voice["source"]["path_on_server"] for voice in voices]
    assert len(set(paths)) == len(paths), paths


@pytest.mark.parametrize("directory", SHIPPED, ids=shipped_id)
async def test_every_shipped_character_renders_as_a_voice_sample(
    make_server: MakeServer, directory: Path,
) -> None:
    """Hidden ones too (``good`` not True): a reload may make them public."""
    server = await make_server(characters_dir=directory)
    characters = server.app[VOICES].characters

    report = server.app[VOICES].report

    rendered = [dialects.voice_source(c.name, c.voice_source) for c in characters]

    assert report is not None and report.errors == []  # every file is a character
    for character, source in zip(characters, rendered, strict=True):
        VoiceSample.model_validate({"name": character.name, "comment": character.comment,
                                    "good": character.good, "source": source})
    paths = [source["path_on_server"] for source in rendered]
    assert len(set(paths)) == len(paths), paths


# ── the id, sent back ────────────────────────────────────────────────────────


@pytest.mark.parametrize("directory", SHIPPED, ids=shipped_id)
async def test_each_voice_path_selects_its_character(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    directory: Path,
) -> None:
    """What the frontend does: ``voice`` is the chosen entry's ``path_on_server``. The
    character greets, and the TTS speaks with the voice its file names (piper's,
    eSpeak's), not the id shown to the client."""
    server = await make_server(characters_dir=directory, llm=fake_openai.base_url,
                               tts=fake_kyutai_tts.url)
    voices = await voices_of(server)
    own_source = {c.name: c.voice_source for c in server.app[VOICES].characters}
    fake_openai.script(*(text("Hello.") for _ in voices))

    for voice in voices:
        path = voice["source"]["path_on_server"]
        # Connected as Unmute's frontend does: no ``?model=``.
        session = Unmute(await server.ws_connect("/v1/realtime", protocols=("realtime",)))
        try:
            await session.send({"type": "session.update", "session": {
                "voice": path, "instructions": INSTRUCTIONS, "allow_recording": False}})
            events = await session.until("response.audio.done")
        finally:
            await session.ws.close()

        assert events[0]["type"] == "session.updated", events[0]
        assert events[0]["session"]["voice"] == voice["name"]
        assert events[1]["type"] == "response.created"
        assert events[1]["response"]["voice"] == voice["name"]
        source = own_source[voice["name"]]
        assert fake_kyutai_tts.connections[-1].query.get("voice") == (
            source.get("path_on_server") or source.get("voice")), (path, source)


# ── each kind of VOICE_SOURCE ────────────────────────────────────────────────

CREDITS = {"id": 785958, "name": "Hello", "username": "balloonhead", "license": "CC BY 4.0"}
FREESOUND = "https://freesound.org/people/balloonhead/sounds/785958/"


@pytest.mark.parametrize(("own", "shown"), [
    pytest.param(
        {"source_type": "piper", "voice": "en_US-joe-medium", "description": "Joe."},
        {"source_type": "file", "path_on_server": "piper/en_US-joe-medium/Bea",
         "description": "Joe."},
        id="piper"),
    pytest.param(
        {"source_type": "espeak"},
        {"source_type": "file", "path_on_server": "espeak/Bea"},
        id="espeak-without-voice"),
    pytest.param(
        {"source_type": "file", "path_on_server": "voices/bea.wav", "speed": 1.2,
         "description_link": "https://example.org/bea"},
        {"source_type": "file", "path_on_server": "voices/bea.wav",
         "description_link": "https://example.org/bea"},
        id="file-with-extra-fields"),
    pytest.param(
        {"source_type": "file"},
        {"source_type": "file", "path_on_server": "file/Bea"},
        id="file-without-path"),
    pytest.param(
        {"source_type": "freesound", "url": FREESOUND, "start_time": 3,
         "path_on_server": "unmute-prod-website/freesound/785958.mp3",
         "sound_instance": {**CREDITS, "previews": {"preview_hq_mp3": "x"}}},
        {"source_type": "freesound", "url": FREESOUND, "start_time": 3,
         "path_on_server": "unmute-prod-website/freesound/785958.mp3",
         "sound_instance": CREDITS},
        id="freesound"),
    pytest.param(
        {"source_type": "freesound", "url": FREESOUND, "path_on_server": "fs/785958.mp3"},
        {"source_type": "file", "path_on_server": "fs/785958.mp3",
         "description_link": FREESOUND},
        id="freesound-without-credits"),
])
def test_a_voice_source_is_shown_in_one_of_unmutes_shapes(
    own: dict[str, Any], shown: dict[str, Any],
) -> None:
    rendered = dialects.voice_source("Bea", own)

    assert rendered == shown
    VoiceSample.model_validate({"name": "Bea", "comment": None, "good": True,
                                "source": rendered})
    assert dialects.voice_path("Bea", own) == shown["path_on_server"]
