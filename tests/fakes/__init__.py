"""Loopback servers that speak each remote protocol exactly, for the tests and for
``scripts/`` (``make bench``, ``make loadtest``, ``make chaos``), which import them as
``tests.fakes.…``.

    kyutai_stt   moshi-server's ``/api/asr-streaming``, scripted   (``fake_kyutai_stt``)
    kyutai_tts   moshi-server's ``/api/tts_streaming``, a tone      (``fake_kyutai_tts``)
    openai_chat  OpenAI's ``/v1/models`` and ``/v1/chat/completions`` (``fake_openai``)
    fault_proxy  a TCP proxy that delays, stalls, cuts or resets chosen connections
    loopback     serving an aiohttp app on 127.0.0.1, on a free port

The names in brackets are pytest fixtures, registered for every test through
``pytest_plugins`` in ``tests/conftest.py``.
"""
