"""Troupe's terminal client: list, load and talk to a session's characters, in text
or speech (a WAV file, or the microphone).

Run it from the checkout with the server running (``make run`` serves
http://127.0.0.1:8000 with the bundled characters)::

    .venv/bin/python -m scripts.client list
    .venv/bin/python -m scripts.client reload /srv/characters/pirates
    .venv/bin/python -m scripts.client reload default
    .venv/bin/python -m scripts.client say "hello there" --voice Bramble
    .venv/bin/python -m scripts.client say "Ahoy" --directory /srv/characters/pirates
    .venv/bin/python -m scripts.client say --wav question.wav --save-audio answer.wav
    .venv/bin/python -m scripts.client say "hi" --save-audio answer.wav
    .venv/bin/python -m scripts.client chat --voice Wren
    .venv/bin/python -m scripts.client chat --mic --voice Wren
    .venv/bin/python -m scripts.client --url ws://otherhost:8000/v1/realtime?model=x list

Each run opens one WebSocket session (``GET /v1/realtime?model=...``, subprotocol
``realtime``, the OpenAI GA dialect, so the URL needs a ``model`` parameter) and
closes it before exiting. Every session starts on the server's default characters;
``reload`` and ``say --directory`` only change that session's set, so ``list`` after
``reload`` in another run shows the default set again (``chat`` keeps one session).

Commands:

- ``list``: the session's characters, one a line: name, whether its file calls it
  good (yes / no / -) and its comment.
- ``reload DIR``: load DIR (absolute, under a root the server allows with
  ``--allowed-root``; a relative DIR is made absolute here; ``default`` is the server's
  own set) and print how many files loaded, each file's error and the duration.
- ``say TEXT [--voice NAME] [--directory DIR] [--save-audio OUT.wav]``: optionally
  reload DIR, select NAME, send TEXT as a user message and print the reply as it
  streams. Notes about the reload and the selection go to stderr, the reply alone to
  stdout. ``--save-audio`` writes the spoken reply to OUT.wav.
- ``say --wav IN.wav [--fast] [...]``: speak IN.wav to the character instead of
  typing. Any WAV (or other file ``soundfile`` reads), any rate and channels: it is
  mixed to mono and resampled to 24 kHz here. What the server heard goes to stderr as
  ``heard: ...``, the reply to stdout.
- ``chat [--voice NAME] [--directory DIR]``: read lines from stdin until end of input
  or ``/quit`` and print each streamed reply, with the commands ``/list``,
  ``/voice NAME``, ``/reload DIR`` and ``/help``. Selecting another character or
  reloading starts a new conversation (the server clears the history).
- ``chat --mic [--voice NAME] [--directory DIR]``: talk through the microphone. The
  server decides when you have finished (its turn detection) and answers; the reply is
  printed and played on the default output device (none: text only, with a note).
  Speaking over a reply interrupts it, so use headphones: the character hearing itself
  through the microphone interrupts itself. ``/quit``, the end of input or Ctrl-C ends it.

Speech, as it flows (all audio on the wire is pcm16, 24 kHz mono, base64)::

    say --wav IN.wav ─ mono, 24 kHz ─▶ input_audio_buffer.append, 80 ms each
                       (at real time; --fast: as fast as the connection takes it)
        ─▶ input_audio_buffer.commit (push-to-talk: the turn ends with the file)
        ◀─ conversation.item.input_audio_transcription.delta / .completed ─▶ stderr
        ─▶ response.create
        ◀─ response.output_text.delta ─▶ stdout
        ◀─ response.output_audio.delta ─▶ --save-audio OUT.wav (24 kHz mono pcm16)

    chat --mic: microphone ─▶ append every 80 ms; the server's turn detection answers
        on its own when you pause: transcript ─▶ stderr, text ─▶ stdout, audio ─▶ speaker

``--wav`` and ``--mic`` need a server with a speech-to-text backend (its ``--stt``
option; without one the server answers ``backend_unavailable``), and any reply audio
a text-to-speech backend (``--tts``); without it ``--save-audio`` fails with a note
(the reply text is still printed). The replies come
from the server's language model (``--llm``), or from its built-in responder, which
says it is not a model and repeats what it heard. Each command asks only for the reply
audio it uses (``session.update`` ``output_modalities``), so a text ``say`` costs the
server no speech synthesis.

The microphone goes through ``sounddevice`` (PortAudio). It is kept thin and is not
covered by the tests, which run without a sound card; only its absence (PortAudio not
installed: a note on what to install) is.

On a server with API keys, set ``TROUPE_API_KEY`` (it goes in ``Authorization: Bearer``;
never on the command line). A refused connection says why (HTTP 401, 403, 429, 503).

Every wait for the server has a limit (``--timeout``, 30 s: for an answer as a whole,
for a streamed reply between two of its events, and for the transcript once a file
is sent; not while the file or the microphone is streaming). Errors from the server
are printed to stderr as ``error: CODE: message``.

Exit status: 0 when everything asked for worked (``chat``: at ``/quit`` or the end of
input, even if the server refused some lines); 1 on an error event (``list``,
``reload``, ``say``; for ``chat --mic``, one answering the audio, such as no
speech-to-text), a reply that did not complete, nothing heard in the file, no reply
audio to save, a timeout, a refused or lost connection; 2 for a bad command line, or
something needed before anything is sent (an input file that is missing or not audio,
no directory for ``--save-audio``, no PortAudio or no microphone); 130 when
interrupted.

The package, in the order it is built (each module imports only the ones above it)::

    errors      the Failure tree, ``report`` and ``note`` (stderr)
    connection  one WebSocket session: ``connect``, ``Connection``, ``first_of``
    session     requests: list, reload, select, configure
    replies     a streamed reply on stdout, what the server heard on stderr
    audio       speech from a file, reply audio to a file (24 kHz mono pcm16)
    mic         the microphone and the speaker (``chat --mic``)
    output      characters and reload results as the commands print them
    commands    ``list``, ``reload``, ``say``, ``chat``
    cli         the command line and the exit status (``__main__`` runs it)
"""

from scripts.client.audio import read_speech
from scripts.client.errors import CannotStart

__all__ = ["CannotStart", "read_speech"]
