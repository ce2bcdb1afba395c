"""Hooks through which the sandbox reports what it does, without knowing who listens.

The server passes a subclass that feeds its Prometheus metrics and its log; the
defaults do nothing, so the sandbox stays usable (and testable) on its own.
"""

from __future__ import annotations


class Observer:
    def spawned(self, seconds: float) -> None:
        """A child became ready ``seconds`` after its start was asked for."""

    def spawn_failed(self, error: BaseException) -> None:
        """The pool could not start a child; it retries."""

    def call(self, method: str, seconds: float) -> None:
        """A request to a child finished (successfully or not)."""

    def crashed(self, label: str, reason: str) -> None:
        """A child died during a call or a load."""

    def timed_out(self, label: str, what: str) -> None:
        """A call or a file missed its deadline and the child was killed."""

    def output(self, label: str, text: str) -> None:
        """Character code wrote ``text`` to stdout/stderr."""
