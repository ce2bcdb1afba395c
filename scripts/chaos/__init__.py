"""``make chaos``: many sessions, repeated faults of every kind, one table.

    python -m scripts.chaos [--sessions 6] [--turns 3] [--rounds 3] [--only llm-stall,…]

    fakes (tests/fake_*.py) ◀── FaultProxy ◀── server (in this process, on 127.0.0.1,
                                                 aiohttp's AppRunner as ``run_app``)
                                                    ▲
                                  sessions (aiohttp clients) ───┘

Each phase opens ``--sessions`` sessions that take ``--turns`` turns each (typed, or
spoken for the speech-to-text phases) while an injector hurts ``--rounds`` backend
connections, sandbox children or model workers; then the sessions close and the server
settles. The last phase stops a ``python -m server`` process with SIGTERM while its
sessions talk. The table gives, per phase: faults injected, sessions disturbed (an
error, a turn not completed, or an unexpected close), turns completed and lost,
errors by code, and what was left once it settled: processes (strays below the zygote,
pool children nobody holds, zombies), this process's fds above the phase's start,
per-session metric series. The server's log goes to a file (its path is printed).

The package, each module importing only the ones above it::

    stage     the fakes behind fault proxies, and the server in this process
    players   the sessions a phase opens, their turns, waits for an answer
    phase     one phase: sessions play while an injector works; its row of the table
    injectors what hurts backends (through the proxies) and sandbox children
    phases    the phases in order: backends, sandbox, embedded models, SIGTERM
    __main__  the command line, the run, the summary line
"""
