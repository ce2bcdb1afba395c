"""Troupe's load test: how many sessions one server process holds, what reloads cost
under load, and that sessions never see each other's characters (DESIGN.md §8).

Run it from the checkout (``make loadtest ARGS="..."``)::

    .venv/bin/python -m scripts.loadtest --spawn-server                     # reload-storm
    .venv/bin/python -m scripts.loadtest --spawn-server --scenario capacity --sessions 300
    .venv/bin/python -m scripts.loadtest --spawn-server --scenario churn --duration 900
    .venv/bin/python -m scripts.loadtest --url ws://127.0.0.1:8000/v1/realtime?model=lt \\
        --characters-root /srv/characters/loadtest --scenario reload-storm

``--spawn-server`` starts, on 127.0.0.1, the test suite's protocol-faithful fake
backends (Kyutai STT and TTS, an OpenAI-compatible LLM: ``scripts/loadtest/fakes.py``)
and ``python -m server`` pointed at them, with a temporary allowed root holding the
generated character directories; everything it starts is stopped by pid at the end.
Without it, ``--url`` names a running server (default: the local ``make run`` one);
reload scenarios then need ``--characters-root``, a directory inside one of that
server's ``--allowed-root``s, where the character directories are written (and
removed afterwards). Only loopback addresses are accepted unless
``--allow-non-loopback``. Server memory, CPU and leftover processes are read from
``/proc`` when the server is a process on this machine; with ``TROUPE_ADMIN_TOKEN``
set to the server's admin token, the end of the measured part also asks
``/v1/sessions`` for the live sessions and their sandboxes' memory.

What a session does (GA dialect, ``?model=``): it connects, offering
``permessage-deflate`` as browsers and the ``websockets`` library (the ``openai``
SDK's transport) do (``--no-compression``: it does not), waits for
``session.created`` and lists its default characters (session start). A streaming
session then sends real speech in real time, 80 ms of 24 kHz pcm16 at a time, in a
loop (``scripts/loadtest/audio.py``): a question synthesised once by the embedded
piper voice and cached under the system temp directory (``--wav`` to use another
file); the character's reply, which the person interrupts (a shorter utterance
spoken over it, starting at a moment drawn per run, different in each of the
cycle's two blocks); the reply to the interruption, heard to the end; silence. The
server's turn-taking answers each utterance, cancels the reply spoken over
(``response.done`` cancelled) and the session receives the reply audio. With
``--no-interruptions`` the cycle is one question and its whole reply. A reloading
session reloads its own generated directories (``scripts/loadtest/characters.py``:
20 characters each, some sharing file names with every other session's) and checks
that both the reload's answer and a list right after it name exactly the
directory's characters: any character of another session's set is an isolation
violation, printed with its details.

Scenarios (``--scenario``; what ``--sessions``, ``--duration`` and ``--ramp`` mean):

- ``capacity``: streaming sessions join at ``--ramp`` a second, up to ``--sessions``;
  each 5 s window is judged (p99 frame lateness ≤ 20 ms, no error); the run stops after
  two windows in a row out of budget, or ``--duration`` after the last session started
  streaming. Sessions held = the most sessions streaming through a whole window within
  budget.

Every streaming session starts at a random point of the speech cycle (it waits up to
one cycle after joining), so replies are spread over time however fast the ramp.
- ``reload-storm``: ``--sessions`` join at ``--ramp``; ``--reload-fraction`` (10 %) of
  them reload at ``--reload-rate`` each while the rest stream. After two cycles of
  warm-up, ``--duration`` alternates calm phases (nobody reloads) and storm phases,
  about 5 s each, so that the machine's background load falls on both sides; the
  budget compares the streamers' p99 lateness in the storm phases with the calm ones.
- ``churn``: ``--sessions`` workers run connect / reload / disconnect cycles until
  ``--cycles`` (10 000) are done or ``--duration`` has passed; then leftover
  processes, leftover per-session metric series, and the drift of the server's RSS
  from after the warm-up (the first 2 %, at least 50 cycles) to the end, both taken
  with the server idle.

Figures (milliseconds; percentiles interpolate between ranks):

- reload: from sending ``session.characters.reload`` to ``.reloaded``.
- session start: from opening the WebSocket to ``session.characters.listed``.
- first audio: from sending the last 80 ms of an utterance to the first
  ``response.output_audio.delta`` of the reply to its turn.
- audio-frame lateness, per reply frame k after the first (t0 = the first frame's
  arrival, S_k = samples before frame k, lead = the server's ``--audio-lead``)::

      lateness_k = max(0, arrival_k - (t0 + max(0, S_k / 24000 - lead)))

  The server sends the first ``lead`` seconds of a reply at once and every later
  frame ``lead`` ahead of real time, so an on-time frame has lateness 0. A reply cut
  short by an interruption just stops: its frames count up to its
  ``response.done``, frames arriving after it are only tallied (``stale_frames``).
  Measured in this process: "load generator lag" (how late its own event loop
  wakes) says how much of it may be the load generator's own.
- memory: server RSS (and PSS), the PSS of every process below the server (fork
  server and sandbox children), per session = (that at full load − the idle server
  before the run) / sessions. Leftover processes = processes below the server once
  every session has closed and the server has settled, minus those before the run
  and the children it keeps warm on purpose (``/v1/health``'s ``sandbox.warm``:
  directories loaded twice recently, kept loaded for the next load).
- CPU: % of one core per process group, from ``/proc``, and "other processes": the
  rest of the machine's busy time. The spawned fakes and this load generator share
  the machine with the server (about 0.45 % of a core per streaming session between
  them on the 2-core dev machine), and anything else running there shows up as
  lateness: compare the figures of runs whose "other processes" share was low.

Output: a progress line on stderr; at the end a summary table on stdout with each
budget of DESIGN.md §8 this scenario measures; a JSON file with every figure
(``--json``, default ``bench-results/loadtest-SCENARIO.json``) and a self-contained
HTML page of charts (``--plot``, default ``bench-results/loadtest-SCENARIO.html``);
with ``--spawn-server``, the server's and the fakes' output goes beside the JSON file
(``….server.log``).
``--profile FILE`` also records the server with py-spy while the load runs (``.svg``:
flame graph, ``.json``: speedscope, else raw collapsed stacks).

The JSON file's top level: ``scenario``, ``sessions_requested``, ``sessions_held``,
``isolation_violations`` (count), ``reload_mismatches``, ``reload_ms``,
``session_start_ms``, ``session_created_ms``, ``first_audio_ms``,
``frame_lateness_ms`` (each ``{count, p50, p95, p99, max, mean}``),
``errors_by_code`` (server codes, and ``client.*`` for what the client saw: a refused
connection, a close code, a timeout), ``clients`` (whether sessions interrupted and
offered compression, how many negotiated it, the interruption offsets),
``interruptions_made``, ``interruptions_missed`` (found no reply going),
``questions_over_late_replies``, ``interrupted_at_ms`` (reply audio received when
each interruption began),
``responses`` (``response.done`` by status: completed, cancelled, failed),
``turns`` (asked, answered, merged, superseded, in flight at the end, unanswered:
``scripts/loadtest/result.Turns``), ``leftover_processes``, ``orphan_processes``,
``server_rss_mb``, ``sandbox_pss_mb_per_session``, ``memory_mb_per_session``,
``cpu_percent``, ``budgets`` (each ``{name, value, limit, comparison, unit, ok,
binding, note}``), ``passed``, the scenario's own section (``capacity``,
``reload_storm`` or ``churn``), ``distributions`` (101 percentiles per figure),
``timeline`` (one point a second) and the examples of errors and violations.

Bounded: at most 2000 sessions, 100 000 cycles and an hour; every wait for the
server is limited by ``--timeout``; the run stops by itself.

Exit status: 0 when the run completed within its budgets; 1 when a budget or the
isolation check failed, or the server could not be started or reached; 2 on bad
usage; 130 when interrupted.

The modules::

    __main__   the run: prepare, start what is asked, the scenario, the result
    cli        the command line
    audio      the speech cycle sessions send      characters  their directories
    sessions   one session on its WebSocket        roles       what sessions do
    scenarios  capacity, reload-storm, churn       monitor     the timeline, py-spy
    server     the server under test, its fakes    fakes       the fakes' process
    stats      samples and budgets                 result      the result's shape
    report     the table, the JSON file, the charts
"""

