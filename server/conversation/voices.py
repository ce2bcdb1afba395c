"""How Unmute's clients know a character's voice (DESIGN.md §6): ``voice_source`` shows
a ``VOICE_SOURCE`` in one of the two shapes they accept (``/v1/voices``), and
``voice_path`` is the id they select the character by in ``session.update``, which
``find`` resolves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sandbox import CharacterInfo


def find(characters: Sequence[CharacterInfo], voice: str) -> CharacterInfo | None:
    """The character named ``voice``, else the one whose voice path is ``voice``: the
    ``path_on_server`` that ``/v1/voices`` shows for it, or the one its file gives."""
    for character in characters:
        if character.name == voice:
            return character
    for character in characters:
        source = character.voice_source
        if voice in (voice_path(character.name, source), source.get("path_on_server")):
            return character
    return None


def voice_path(name: str, source: Mapping[str, Any]) -> str:
    """The ``path_on_server`` Unmute's clients know the character ``name`` by, and send
    back as ``voice`` to select it: a file or freesound source's own path (the TTS
    speaks from it), else ``<source_type>/<voice>/<name>`` (``piper/en_US-joe-medium/
    Bramble``), which names the character because characters share piper voices."""
    path = source.get("path_on_server")
    if source.get("source_type") in ("file", "freesound") and isinstance(path, str) and path:
        return path
    kind, voice = source.get("source_type"), source.get("voice")
    parts = [str(kind), *([str(voice)] if isinstance(voice, str) and voice else []), name]
    return "/".join(parts)


_FREESOUND_INSTANCE = {"id": int, "name": str, "username": str, "license": str}


def voice_source(name: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """``source`` as Unmute's clients accept it (DESIGN.md §6): its freesound shape when
    ``source`` has all of it (the frontend credits ``sound_instance.username``), else a
    ``file`` source at ``voice_path``, keeping the description. Unmute's models forbid
    extra fields, so only theirs are copied; the character keeps its own source for
    the TTS."""
    path = voice_path(name, source)
    instance = source.get("sound_instance")
    if (source.get("source_type") == "freesound" and isinstance(source.get("url"), str)
            and isinstance(instance, Mapping)
            and all(type(instance.get(key)) is kind for key, kind in _FREESOUND_INSTANCE.items())):
        shown: dict[str, Any] = {
            "source_type": "freesound", "url": source["url"], "path_on_server": path,
            "sound_instance": {key: instance[key] for key in _FREESOUND_INSTANCE},
        }
        start = source.get("start_time")
        if type(start) is int:
            shown["start_time"] = start
        return shown
    shown = {"source_type": "file", "path_on_server": path}
    for key in ("description", "description_link"):
        if isinstance(source.get(key), str):
            shown[key] = source[key]
    if "description_link" not in shown and isinstance(source.get("url"), str):
        shown["description_link"] = source["url"]  # a freesound without its credits
    return shown
