"""The embedded language model with two worker processes: real llama.cpp workers.

Two replies at once are written by two processes at the same time; a worker killed
or hung fails only the reply it was writing; closing leaves no process behind.
Whether two processes compute at once is seen in their CPU time (``/proc``), not in
wall-clock durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import pytest
from conftest import SCALE
from fault_checks import cpu_ticks, descendants, eventually, pid_alive, zombies

from server.backends.embedded.llm import EmbeddedLLM
from server.backends.errors import BackendUnavailable
from server.backends.llm import TextDelta

pytestmark = pytest.mark.timeout(300)

SYSTEM = "You are a friendly sailor."
STORY = [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": "Tell me a long story about the sea."}]


@pytest.fixture
async def llm() -> AsyncIterator[EmbeddedLLM]:
    llm = EmbeddedLLM(threads=1, workers=2)
    try:
        await llm.start()
        yield llm
    finally:
        await llm.close()


class Reply:
    """One reply read as it comes: its text and how many tokens so far."""

    def __init__(self, llm: EmbeddedLLM) -> None:
        self.text = ""
        self.tokens = 0
        self.task = asyncio.create_task(self._read(llm))

    async def _read(self, llm: EmbeddedLLM) -> str:
        async for item in llm.stream(STORY, [], 0.7):
            assert isinstance(item, TextDelta)
            self.text += item.text
            self.tokens += 1
        return self.text

    def past(self, tokens: int) -> bool:
        """It has more than ``tokens`` tokens, or it ended."""
        return self.tokens > tokens or self.task.done()


async def test_two_replies_at_once_are_written_by_two_processes_at_once(
        llm: EmbeddedLLM) -> None:
    await llm.prepare(SYSTEM)
    pids = llm.pids
    assert len(pids) == 2 and len(set(pids)) == 2
    first, second = Reply(llm), Reply(llm)
    assert await eventually(lambda: first.tokens > 0 and second.tokens > 0, 60)
    # Both replies have begun and neither has ended: one on each worker.
    assert not first.task.done() and not second.task.done()
    assert sorted(llm.pids) == sorted(pids)
    before = {pid: cpu_ticks(pid) for pid in pids}
    seen = first.tokens, second.tokens
    assert await eventually(lambda: first.past(seen[0] + 6) and second.past(seen[1] + 6), 60)
    # Tokens of both kept coming, and both processes were computing meanwhile.
    assert all(cpu_ticks(pid) > before[pid] for pid in pids)
    texts = await asyncio.gather(first.task, second.task)
    assert all(text.strip() for text in texts)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
async def test_a_worker_killed_or_hung_fails_only_its_own_reply(
        llm: EmbeddedLLM, signum: signal.Signals) -> None:
    await llm.prepare(SYSTEM)
    replies = [Reply(llm), Reply(llm)]
    assert await eventually(lambda: all(reply.tokens > 0 for reply in replies), 60)
    victim, survivor = llm.pids  # each writing one of the replies
    llm.stall_timeout = 2.0 * SCALE
    os.kill(victim, signum)
    outcomes = await asyncio.gather(*(reply.task for reply in replies),
                                    return_exceptions=True)
    llm.stall_timeout = 60.0
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], BackendUnavailable)
    why = "stopped answering" if signum is signal.SIGSTOP else "process ended"
    assert why in str(failures[0]) and "the next reply starts a new one" in str(failures[0])
    assert any(isinstance(outcome, str) and outcome.strip() for outcome in outcomes)
    assert not pid_alive(victim) and pid_alive(survivor)
    # Next: two replies at once again, one on the survivor, one on a new process.
    again = await asyncio.gather(Reply(llm).task, Reply(llm).task)
    assert all(text.strip() for text in again)
    assert survivor in llm.pids and victim not in llm.pids and len(llm.pids) == 2


async def test_close_leaves_no_process_and_no_task(llm: EmbeddedLLM) -> None:
    reply = Reply(llm)
    assert await eventually(lambda: reply.tokens > 0, 60)
    pids = llm.pids
    assert len(pids) == 2
    reply.task.cancel()  # a barge-in: the worker is told to stop
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task
    await llm.close()
    assert llm.pids == [] and not any(pid_alive(pid) for pid in pids)
    assert not descendants(os.getpid()) & set(pids) and not zombies()
    assert asyncio.all_tasks() == {asyncio.current_task()}
