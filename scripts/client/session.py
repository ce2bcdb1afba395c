"""What the client asks of its session, one request and its answer each: list,
reload or select the characters, and the session's settings (reply audio, turns)."""

from __future__ import annotations

import os

from scripts.client.connection import Connection
from scripts.client.errors import Event


def absolute_directory(directory: str) -> str:
    """``default`` as is; a relative path from this process's current directory."""
    return directory if directory == "default" else os.path.abspath(directory)


async def list_characters(connection: Connection) -> Event:
    return await connection.request({"type": "session.characters.list"},
                                    "session.characters.listed")


async def reload(connection: Connection, directory: str) -> Event:
    event = {"type": "session.characters.reload", "directory": absolute_directory(directory)}
    return await connection.request(event, "session.characters.reloaded")


async def select(connection: Connection, voice: str) -> str:
    """Select a character by name or voice path; returns the name the server chose."""
    updated = await connection.request(
        {"type": "session.update", "session": {"voice": voice}}, "session.updated")
    session = updated.get("session") or {}
    output = ((session.get("audio") or {}).get("output") or {})
    return str(output.get("voice") or session.get("voice") or voice)


async def configure(connection: Connection, *, speak: bool,
                    audio_input: Event | None = None) -> None:
    """Ask for reply audio only if it is used (the server then skips speech
    synthesis) and set the GA ``audio.input`` settings (turn detection) if given."""
    session: Event = {"type": "realtime",
                      "output_modalities": ["text", "audio"] if speak else ["text"]}
    if audio_input is not None:
        session["audio"] = {"input": audio_input}
    await connection.request({"type": "session.update", "session": session},
                             "session.updated")


PUSH_TO_TALK: Event = {"turn_detection": None}
"""The turn ends when the client commits the audio, and the reply waits for
``response.create``."""
SERVER_TURNS: Event = {"turn_detection": {"type": "server_vad"}}
"""The server ends the turn when the person pauses, and answers on its own."""


def user_message(text: str) -> Event:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]}}
