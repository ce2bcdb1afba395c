"""Character: Bramble — a tabletop game master who rolls real dice through tools."""

import random

CHARACTER_NAME = "Bramble"

VOICE_SOURCE = {
    "source_type": "piper",
    "voice": "en_US-joe-medium",
    "description": "Piper's Joe voice (US English, medium quality).",
}

INSTRUCTIONS = {
    "instruction_prompt": (
        "You are Bramble, a warm and slightly mischievous game master running a "
        "one-player fantasy adventure by voice. The setting is the Lantern Fen, a misty "
        "marsh where the lanterns of drowned villages still glow under the water, and "
        "the player is a traveller hired to find out why the ferry keeper vanished. "
        "Begin by asking the player's name and what kind of hero they are, then set "
        "the scene in two or three vivid sentences and ask what they do. Keep the story "
        "moving, offer choices without forcing them, and give non-player characters "
        "their own way of talking. Whenever an outcome is uncertain, such as a sneak, a "
        "leap, a fight or a persuasion, call the roll_dice tool instead of deciding the "
        "result yourself: a twenty-sided die for most checks, where ten or more "
        "succeeds, and the usual dice for damage. Use flip_coin for simple fifty-fifty "
        "events, and roll_history if the player asks what they rolled earlier. Say the "
        "numbers you got out loud in words, then narrate what happens."
    ),
    "language": "en",
}

METADATA = {"good": True, "comment": None}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "roll_dice",
            "description": (
                "Roll one or more dice with the same number of sides and return every "
                "result and the total."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "sides": {
                        "type": "integer",
                        "description": "Sides per die, from 2 to 100 (e.g. 20 for a d20).",
                    },
                    "count": {
                        "type": "integer",
                        "description": "How many dice to roll, from 1 to 20. Defaults to 1.",
                    },
                },
                "required": ["sides"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "flip_coin",
            "description": "Flip a fair coin and return heads or tails.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "roll_history",
            "description": "List the most recent dice rolls and coin flips of this game.",
            "parameters": {
                "type": "object",
                "properties": {
                    "limit": {
                        "type": "integer",
                        "description": "How many recent results to list, from 1 to 20. "
                        "Defaults to 5.",
                    },
                },
            },
        },
    },
]

_MAX_SIDES = 100
_MAX_COUNT = 20
_HISTORY_KEPT = 50


class _BadArgument(ValueError):
    """A tool argument the model got wrong; its message goes back to the model."""


def _integer(arguments: dict, key: str, default: int | None, low: int, high: int) -> int:
    """Read an integer argument, tolerating 6.0 and "6", which models sometimes send."""
    value = arguments.get(key, default)
    if value is None:
        raise _BadArgument(f"'{key}' is required")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _BadArgument(f"'{key}' must be a whole number, got {value!r}") from None
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadArgument(f"'{key}' must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise _BadArgument(f"'{key}' must be between {low} and {high}, got {value}")
    return value


class PromptGenerator:
    """Keeps the session's dice and its roll history; the system prompt never changes."""

    def __init__(self, instructions: dict) -> None:
        self.instructions = instructions
        seed = instructions.get("seed")
        # No seed means fresh dice every session; a seed makes a game replayable.
        self._random = random.Random(seed if isinstance(seed, int | str) else None)
        self.history: list[str] = []

    def make_system_prompt(self) -> str:
        from unmute.llm.system_prompt import (
            _SYSTEM_PROMPT_BASICS,
            _SYSTEM_PROMPT_TEMPLATE,
            LANGUAGE_CODE_TO_INSTRUCTIONS,
            get_readable_llm_name,
        )

        return _SYSTEM_PROMPT_TEMPLATE.format(
            _SYSTEM_PROMPT_BASICS=_SYSTEM_PROMPT_BASICS,
            additional_instructions=self.instructions["instruction_prompt"],
            language_instructions=LANGUAGE_CODE_TO_INSTRUCTIONS.get(
                self.instructions.get("language")
            ),
            llm_name=get_readable_llm_name(),
        )

    def handle_tool_call(self, name: str, arguments: dict) -> str:
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return f"Error: the arguments of {name} must be a JSON object."
        handlers = {
            "roll_dice": self._roll_dice,
            "flip_coin": self._flip_coin,
            "roll_history": self._roll_history,
        }
        handler = handlers.get(name)
        if handler is None:
            return f"Error: there is no tool named {name!r}; use one of {', '.join(handlers)}."
        try:
            return handler(arguments)
        except _BadArgument as exc:
            return f"Error in {name}: {exc}. Call it again with corrected arguments."

    def _roll_dice(self, arguments: dict) -> str:
        sides = _integer(arguments, "sides", None, 2, _MAX_SIDES)
        count = _integer(arguments, "count", 1, 1, _MAX_COUNT)
        rolls = [self._random.randint(1, sides) for _ in range(count)]
        if count == 1:
            result = f"Rolled one d{sides}: {rolls[0]}."
        else:
            listed = ", ".join(str(roll) for roll in rolls)
            result = f"Rolled {count}d{sides}: {listed}. Total {sum(rolls)}."
        self._remember(result)
        return result

    def _flip_coin(self, arguments: dict) -> str:
        result = f"Flipped a coin: {self._random.choice(['heads', 'tails'])}."
        self._remember(result)
        return result

    def _roll_history(self, arguments: dict) -> str:
        limit = _integer(arguments, "limit", 5, 1, 20)
        if not self.history:
            return "No dice rolled and no coins flipped yet in this game."
        recent = self.history[-limit:]
        return f"The last {len(recent)} results, oldest first: " + " ".join(recent)

    def _remember(self, result: str) -> None:
        self.history.append(result)
        del self.history[:-_HISTORY_KEPT]
