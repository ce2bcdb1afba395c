"""One session's conversation history: chat-completions messages, bounded.

The system prompt is not stored here (it comes from the selected character, built in
the sandbox); ``messages_for`` puts it in front. Trimming drops the oldest turns and
never leaves a tool result without the assistant message that asked for it.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


class Conversation:
    def __init__(self, max_messages: int = 64) -> None:
        self.max_messages = max_messages
        self.messages: list[Message] = []

    def add_user_text(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self._trim()

    def add_assistant_text(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self._trim()

    def with_user_text(self, text: str) -> Conversation:
        """A copy, as it will be once the person's ``text`` is added."""
        then = Conversation(self.max_messages)
        then.messages = list(self.messages)
        then.add_user_text(text)
        return then

    def messages_for(self, system_prompt: str) -> list[Message]:
        """A new list: the system prompt, then the history (callers may append)."""
        return [{"role": "system", "content": system_prompt}, *self.messages]

    def record(self, new: list[Message]) -> None:
        """Keep the messages a reply added (its tool rounds and its answer), in order,
        whatever was added to the history meanwhile."""
        self.messages.extend(new)
        self._trim()

    def clear(self) -> None:
        self.messages.clear()

    def _trim(self) -> None:
        excess = len(self.messages) - self.max_messages
        if excess <= 0:
            return
        del self.messages[:excess]
        while self.messages and self.messages[0]["role"] in ("tool", "assistant"):
            del self.messages[0]
