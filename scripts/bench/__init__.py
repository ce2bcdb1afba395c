"""Troupe benchmark: the DESIGN.md §8 figures that ``make bench`` measures, and the
voice loop's latencies.

Run as ``python -m scripts.bench`` (``make bench``; ``ARGS=--help`` for the counts;
``--only characters`` or ``--only voice`` for one part). A run takes about two
minutes on the 2-core dev machine (the characters part 15 s), binds 127.0.0.1 only
and removes everything it starts. Progress goes to stderr; stdout gets a table and,
as its very last line, one JSON object with ``reload_p50_ms``, ``reload_p99_ms``,
``inprocess_p50_ms``, ``ratio_p50``, ``session_start_p50_ms`` and
``idle_session_mb``, then the ``voice_*`` figures (``voice.VoiceResults``). Budget
misses are shown, not fatal: the exit code is 0 for a completed run and 1 when
something broke (a failed reload, a server that did not start, a leftover process, a
turn that got no reply).

    __main__     the command line, the table and the JSON line
    reloads      the characters part: reload, session start, idle memory
    directories  the generated character directories it reloads
    voice        the voice part (voice_client, voice_fakes, voice_embedded, voice_load)
    common       the server under test (``python -m server``) and a client for it
"""
