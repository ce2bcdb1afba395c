"""The character directories ``make bench`` reloads: two of ``CHARACTER_COUNT`` files
each, in the Unmute fork's format (prompt helpers from ``unmute.llm.system_prompt``),
two files per directory with TOOLS, so that every reload loads other files than the
one before.

    write_directories(root) ─▶ root/a/ada_brennan.py … (20 files)
                             ─▶ root/b/beatrix_hale.py … (20 files, other personas
                                                         at other positions)

``PROMPT_GENERATOR`` (the class every file ends with) is shared with the load test's
generated directories (``scripts/loadtest/characters.py``).
"""

from __future__ import annotations

import pprint
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHARACTER_COUNT = 20

# (role, background, topics): what each generated character is built from.
PERSONAS: list[tuple[str, str, str]] = [
    ("a retired sea captain who now runs a harbour café",
     "You sailed cargo ships between Rotterdam and Singapore for thirty years.",
     "ports, storms, knots and the regulars who drink your coffee"),
    ("a patient piano teacher with forty years of pupils",
     "You believe anyone can learn to play if they practise ten minutes a day.",
     "scales, favourite composers, stage fright and how to practise"),
    ("a mountain rescue volunteer in the Scottish Highlands",
     "You have carried more lost walkers down in the fog than you can count.",
     "weather, maps, kit lists and the right way to read a ridge"),
    ("the guide of a crumbling medieval castle",
     "You know every legend of the place and half of them are true.",
     "sieges, secret passages, castle food and the ghost in the west tower"),
    ("the host of a late-night radio call-in show",
     "You have a soft voice and an old record collection, and you hate silence.",
     "old songs, insomnia, callers' confessions and the city at night"),
    ("a beekeeper with sixty hives on a hillside",
     "You talk to your bees every morning and swear they answer.",
     "honey, swarms, flowers, stings and the seasons of a hive"),
    ("a street-food chef with a famous noodle stall",
     "You cook for three hundred people a night from a cart no bigger than a bed.",
     "recipes, spices, markets and cooking fast without burning anything"),
    ("a stand-up comedian between two tours",
     "You test jokes on everyone you meet and keep the ones that land.",
     "bad gigs, timing, hecklers and the funniest things people say by accident"),
    ("a jazz historian who ran a club in the sixties",
     "You saw the greats play in a room that held fifty people.",
     "records, improvisation, club stories and how to listen to a solo"),
    ("an astronomer at a desert observatory",
     "You sleep in the day and watch the sky from dusk until dawn.",
     "planets, comets, telescopes and how to find the constellations"),
    ("a bicycle mechanic who rebuilds old racing bikes",
     "Your workshop smells of chain oil and you can name a frame by its lugs.",
     "gears, punctures, famous races and the perfect Sunday ride"),
    ("the librarian of a small town library",
     "You have read most of the shelves and you love finding the right book.",
     "novels, local history, reading habits and forgotten authors"),
    ("a retired detective who now writes crime novels",
     "You solved real cases for twenty-five years and you still notice everything.",
     "old cases, clues, interviews and how a good mystery is built"),
    ("a gardener who runs a community allotment",
     "You grow vegetables on a plot that was a car park ten years ago.",
     "soil, seeds, pests, compost and what to plant each month"),
    ("a language tutor who teaches French to adults",
     "You make mistakes sound like progress and correct people gently.",
     "French phrases, travel, pronunciation and learning at any age"),
    ("a conservator who restores paintings for a museum",
     "You spend weeks on a square inch of canvas and you love every minute.",
     "pigments, varnish, forgeries and the painters whose work you have saved"),
    ("a former sommelier who now sells rare teas",
     "You traded wine for tea after a trip to the mountains of Yunnan.",
     "tea gardens, brewing times, tasting notes and the history of trade"),
    ("a chess coach at a youth club",
     "You teach children to think three moves ahead and to lose gracefully.",
     "openings, famous games, puzzles and how to stay calm at the board"),
    ("a trail running coach",
     "You have run across deserts and mountains and you still start every run slowly.",
     "training plans, shoes, injuries and the joy of muddy paths"),
    ("a narrator of ghost stories by the campfire",
     "You tell old tales slowly and let the listener decide whether to believe them.",
     "haunted houses, folklore, the sounds of the night and the stories behind them"),
]

NAMES = {
    "a": ["Ada Brennan", "Tomas Ruiz", "Ilse Vogel", "Marcus Flint", "Nadia Osei",
          "Edgar Holm", "Mei Lin", "Oscar Pratt", "Rosa Delgado", "Kenji Sato",
          "Lucie Marchand", "Hugo Stein", "Priya Nair", "Felix Obi", "Claire Dubois",
          "Anton Weber", "Sofia Conti", "Ivan Petrov", "Greta Lund", "Silas Crowe"],
    "b": ["Beatrix Hale", "Dario Mancini", "Elena Novak", "Farid Haddad", "Gwen Parry",
          "Hamish Reid", "Inès Laurent", "Jonas Berg", "Kira Tanaka", "Leo Fischer",
          "Mira Kovac", "Niall Byrne", "Olga Smirnova", "Paulo Costa", "Quentin Roux",
          "Rania Aziz", "Stellan Voss", "Talia Mendes", "Ulrich Baum", "Vera Quinn"],
}
ROTATION = {"a": 0, "b": 7}
"""Directory b gives each persona to another name and another file position."""
LANGUAGES: list[str | None] = ["en", "en", "fr", "en", "en/fr", None, "en", "fr/en"]

PROMPT_GENERATOR = '''

class PromptGenerator:
    def __init__(self, instructions: dict) -> None:
        self.instructions = instructions

    def make_system_prompt(self) -> str:
        from unmute.llm.system_prompt import (
            _DEFAULT_ADDITIONAL_INSTRUCTIONS,
            _SYSTEM_PROMPT_BASICS,
            _SYSTEM_PROMPT_TEMPLATE,
            LANGUAGE_CODE_TO_INSTRUCTIONS,
            get_readable_llm_name,
        )

        return _SYSTEM_PROMPT_TEMPLATE.format(
            _SYSTEM_PROMPT_BASICS=_SYSTEM_PROMPT_BASICS,
            additional_instructions=self.instructions.get("instruction_prompt")
            or _DEFAULT_ADDITIONAL_INSTRUCTIONS,
            language_instructions=LANGUAGE_CODE_TO_INSTRUCTIONS.get(
                self.instructions.get("language")
            ),
            llm_name=get_readable_llm_name(),
        )
'''


@dataclass(frozen=True)
class Tool:
    """What a character with tools adds to its file."""

    imports: str
    definitions: list[dict[str, Any]]
    helpers: str
    handler: str
    """``handle_tool_call``, indented as a method of PromptGenerator."""


def _function(name: str, description: str, properties: dict[str, Any],
              required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }}


TOOLS = {
    "street-food chef": Tool(
        imports="",
        definitions=[_function(
            "convert_units", "Convert a cooking quantity between units (g, oz, ml, cup, c, f).",
            {"value": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            ["value", "from", "to"],
        )],
        helpers='\n_FACTORS = {("g", "oz"): 0.035274, ("oz", "g"): 28.3495,\n'
                '            ("ml", "cup"): 0.00422675, ("cup", "ml"): 236.588}\n',
        handler='''
    def handle_tool_call(self, name: str, arguments: dict) -> str:
        if name != "convert_units":
            return f"Error: there is no tool named {name!r}."
        try:
            value = float(arguments["value"])
            source, target = arguments["from"].lower(), arguments["to"].lower()
        except (KeyError, TypeError, ValueError, AttributeError):
            return "Error: give value, from and to."
        if (source, target) == ("c", "f"):
            result = value * 9 / 5 + 32
        elif (source, target) == ("f", "c"):
            result = (value - 32) * 5 / 9
        elif (source, target) in _FACTORS:
            result = value * _FACTORS[source, target]
        else:
            return f"Error: cannot convert {source} to {target}."
        return f"{value:g} {source} is {result:.1f} {target}."
''',
    ),
    "ghost stories": Tool(
        imports="import random\n\n",
        definitions=[_function(
            "roll_dice", "Roll dice to decide a twist in the story; returns each roll.",
            {"sides": {"type": "integer", "description": "2 to 100"},
             "count": {"type": "integer", "description": "1 to 10"}},
            ["sides"],
        )],
        helpers="",
        handler='''
    def handle_tool_call(self, name: str, arguments: dict) -> str:
        if name != "roll_dice":
            return f"Error: there is no tool named {name!r}."
        sides, count = int(arguments.get("sides", 6)), int(arguments.get("count", 1))
        if not (2 <= sides <= 100 and 1 <= count <= 10):
            return "Error: sides must be 2 to 100 and count 1 to 10."
        rolls = [random.randint(1, sides) for _ in range(count)]
        return f"Rolled {count}d{sides}: {rolls}, total {sum(rolls)}."
''',
    ),
}
TOOL_PERSONAS = {6: TOOLS["street-food chef"], 19: TOOLS["ghost stories"]}


def instructions(name: str, persona: tuple[str, str, str]) -> str:
    role, background, topics = persona
    return (
        f"You are {name}, {role}. {background} You love talking about {topics}, and you "
        "ask the person about their own life as often as you talk about yours. Keep every "
        "answer to a few spoken sentences, check that the person is still listening before "
        "a long story, and never read out lists. When the person says goodbye, answer with "
        "a short farewell that ends with exactly Bye! as its last word, and never write "
        "Bye! at any other time."
    )


def slug(name: str) -> str:
    """``Inès Laurent`` → ``ines_laurent``: file and voice names."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return ascii_name.lower().replace(" ", "_")


def character_source(name: str, persona_index: int, position: int) -> str:
    """One character file in the Unmute fork's format."""
    persona = PERSONAS[persona_index]
    tool = TOOL_PERSONAS.get(persona_index)
    assignments: dict[str, Any] = {
        "CHARACTER_NAME": name,
        "VOICE_SOURCE": {"source_type": "file", "path_on_server": f"voices/{slug(name)}.wav",
                         "description": f"A recorded voice for {name}."},
        "INSTRUCTIONS": {"instruction_prompt": instructions(name, persona),
                         "language": LANGUAGES[position % len(LANGUAGES)]},
        "METADATA": {"good": position % 9 != 8,
                     "comment": None if position % 9 != 8 else "voice still being tuned"},
    }
    if tool is not None:
        assignments["TOOLS"] = tool.definitions
    body = "\n".join(
        f"{key} = {pprint.pformat(value, width=88, sort_dicts=False)}\n"
        for key, value in assignments.items()
    )
    return (f'"""Character: {name}, {persona[0]}."""\n\n'
            + (tool.imports if tool else "") + body
            + (tool.helpers if tool else "")
            + PROMPT_GENERATOR + (tool.handler if tool else ""))


def write_directories(root: Path) -> list[Path]:
    """Two directories of CHARACTER_COUNT different character files each."""
    directories = []
    for label, names in NAMES.items():
        directory = root / label
        directory.mkdir()
        for position, name in enumerate(names):
            persona_index = (position + ROTATION[label]) % len(PERSONAS)
            path = directory / f"{slug(name)}.py"
            path.write_text(character_source(name, persona_index, position))
        directories.append(directory)
    return directories
