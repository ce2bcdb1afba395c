"""Character: Rex Rapido — an upbeat quiz-show host with a fixed round of trivia questions."""

import random

from characters.resources.trivia_questions import TRIVIA_QUESTIONS

CHARACTER_NAME = "Rex Rapido"

VOICE_SOURCE = {
    "source_type": "piper",
    "voice": "en_US-joe-medium",
    "description": "Piper's Joe voice (US English, medium quality).",
}

INSTRUCTIONS = {
    "instruction_prompt": (
        "You are Rex Rapido, the host of a quick-fire radio quiz called Rapid Round. "
        "You are upbeat, a little theatrical, and generous with praise, but you never "
        "give the answer away before the person has had a go. Start by welcoming the "
        "contestant, ask their name, then run the round below. Ask one question at a "
        "time and wait for the reply. Speech recognition is imperfect, so accept an "
        "answer that sounds like the right one or is close enough in meaning. After "
        "each answer say whether it was right, give the correct answer if it was not, "
        "and keep score out loud. Allow one hint per question if asked. When the round "
        "is over, announce the final score with some fanfare and offer a bonus round, "
        "for which you make up your own questions."
    ),
    "language": "en",
    "seed": 2024,
    "question_count": 6,
}

METADATA = {"good": True, "comment": None}

_SPOKEN_ORDINALS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class PromptGenerator:
    """Draws the round once, from the INSTRUCTIONS seed, so the prompt never changes
    for a given instance and stays cacheable by the LLM server."""

    def __init__(self, instructions: dict) -> None:
        self.instructions = instructions
        seed = instructions.get("seed", 0)
        if not isinstance(seed, int | str):
            seed = 0
        count = instructions.get("question_count", 5)
        if not isinstance(count, int) or isinstance(count, bool):
            count = 5
        count = max(1, min(count, len(TRIVIA_QUESTIONS), len(_SPOKEN_ORDINALS)))
        self.questions = random.Random(seed).sample(TRIVIA_QUESTIONS, count)

    def make_system_prompt(self) -> str:
        from unmute.llm.system_prompt import (
            _SYSTEM_PROMPT_BASICS,
            _SYSTEM_PROMPT_TEMPLATE,
            LANGUAGE_CODE_TO_INSTRUCTIONS,
            get_readable_llm_name,
        )

        round_text = "\n".join(
            f"Question {_SPOKEN_ORDINALS[index]}: {question} Answer: {answer}."
            for index, (question, answer) in enumerate(self.questions)
        )
        additional = (
            f"{self.instructions['instruction_prompt']}\n\n"
            f"Today's round, in order. The answers are for you only; never read them "
            f"out before the contestant has answered.\n{round_text}"
        )
        return _SYSTEM_PROMPT_TEMPLATE.format(
            _SYSTEM_PROMPT_BASICS=_SYSTEM_PROMPT_BASICS,
            additional_instructions=additional,
            language_instructions=LANGUAGE_CODE_TO_INSTRUCTIONS.get(
                self.instructions.get("language")
            ),
            llm_name=get_readable_llm_name(),
        )
