"""Voice-loop figures for ``make bench`` (alone: ``python -m scripts.bench --only voice``).

    phase     server                                        what is timed
    fakes     ``python -m server`` with its STT, LLM and    the server's own latency: a
              TTS the protocol fakes of tests/, served on   backend's frame sent → the
              127.0.0.1 by this process                     client's event; end of speech
                                                            → first reply audio
    embedded  ``python -m server`` with the defaults:       end of speech → first reply
              --stt/--tts/--llm embedded                    audio, for a spoken question
    load      ``create_app`` in this process, STT and TTS   event-loop lateness, STT lag
              embedded, LLM the built-in responder (or      and reply audio gaps while N
              embedded: --load-llm)                         sessions talk at once
    accuracy  none: the embedded STT's recogniser in this   its word error rate on the
              process                                       synthesized test speech

Every client is an OpenAI GA session (``voice_client.VoiceSession``) appending 80 ms
of audio at a time at real time and stamping each server event as it arrives; the
fakes stamp each frame just before they write it, with the same clock. End of speech
→ first audio runs from the moment the append holding the last speech sample was
sent to the first ``response.output_audio.delta``, with a breakdown (each step's
time after the end of speech; negative: before it). How each phase is timed is told
in its module: ``voice_fakes``, ``voice_embedded``, ``voice_load``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.common import log
from scripts.bench.voice_accuracy import AccuracyFigures, measure_accuracy
from scripts.bench.voice_client import QUESTION, Question, spoken_question, steps_spread
from scripts.bench.voice_embedded import EmbeddedFigures, measure_embedded
from scripts.bench.voice_fakes import FakeFigures, measure_fakes
from scripts.bench.voice_load import LOAD_WINDOW, LoadFigures, measure_load
from scripts.measure import Spread
from server.backends.embedded.stt import PAUSE_HOLD
from server.config import EMBEDDED

UNMUTE_MS = (450.0, 750.0)
"""Unmute's published end-of-speech to first-audio latency."""
GOAL_P50_MS, GOAL_P99_MS = 900.0, 1500.0
"""End of speech → first audio on the embedded stack (issue 16), the first run after
start-up included, with one session and with the load phase's sessions."""


@dataclass(frozen=True)
class VoiceResults:
    fakes: FakeFigures
    embedded: EmbeddedFigures
    load: LoadFigures
    question_seconds: float
    accuracy: AccuracyFigures

    def figures(self) -> dict[str, float]:
        """Keys of the JSON line (ms unless named otherwise)."""
        added = self.fakes.added
        fake = steps_spread(self.fakes.turns)["first audio"]
        embedded = steps_spread(self.embedded.turns)["first audio"]
        load = self.load
        answered = [s.first_audio for s in load.sessions if s.first_audio is not None]
        figures = {
            "voice_added_audio_p50_ms": added["audio"].p50,
            "voice_added_audio_p99_ms": added["audio"].p99,
            "voice_added_text_p50_ms": added["text"].p50,
            "voice_added_text_p99_ms": added["text"].p99,
            "voice_added_transcript_p50_ms": added["transcript"].p50,
            "voice_added_transcript_p99_ms": added["transcript"].p99,
            "voice_added_turn_end_p50_ms": added["turn_end"].p50,
            "voice_fakes_speech_end_to_audio_p50_ms": fake.p50,
            "voice_fakes_speech_end_to_audio_max_ms": fake.max,
            "voice_embedded_speech_end_to_audio_p50_ms": embedded.p50,
            "voice_embedded_speech_end_to_audio_max_ms": embedded.max,
            "voice_embedded_speech_end_to_audio_p99_ms": embedded.p99,
            "voice_embedded_first_run_ms": self.embedded.turns[0]["first audio"],
            "voice_embedded_warm_up_s": self.embedded.warm_up,
            "voice_stt_word_error_rate": self.accuracy.wer,
            "voice_stt_cpu_per_audio_second": self.accuracy.cpu_per_audio_second,
            "voice_load_sessions": len(load.sessions),
            "voice_load_lateness_p50_ms": load.busy.p50,
            "voice_load_lateness_p99_ms": load.busy.p99,
            "voice_load_lateness_max_ms": load.busy.max,
            "voice_load_stt_lag_p50_ms": self._stt_lags.p50,
            "voice_load_stt_lag_max_ms": self._stt_lags.max,
            "voice_load_transcribed": sum(s.transcript is not None for s in load.sessions),
            "voice_load_speech_end_to_audio_p50_ms": Spread.of(answered).p50,
            "voice_load_speech_end_to_audio_max_ms": Spread.of(answered).max,
            "voice_load_speech_end_to_audio_p99_ms": Spread.of(answered).p99,
            "voice_load_audio_gap_max_s": max((s.gap for s in load.sessions), default=0.0),
        }
        return {key: round(value, 2) for key, value in figures.items()}

    @property
    def _stt_lags(self) -> Spread:
        return Spread.of([lag for s in self.load.sessions for lag in s.stt_lags])

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(figure, value, budget or reference, verdict) rows of the printed table."""
        rows: list[tuple[str, str, str, str]] = []
        added = self.fakes.added
        for kind, label in (("audio", "TTS frame → response.output_audio.delta"),
                            ("text", "LLM chunk → ...output_audio_transcript.delta"),
                            ("transcript", "STT Word → ...transcription.delta"),
                            ("turn_end", "STT pause Step → speech_stopped")):
            spread = added[kind]
            rows.append((f"server-added, {label}",
                         f"{spread.p50:.2f} / {spread.p99:.2f} ms",
                         f"p50 / p99, n={spread.count}", ""))
        rows += self._turn_rows("fakes", self.fakes.turns)
        rows += self._turn_rows("embedded", self.embedded.turns)
        heard = sorted(set(self.embedded.transcripts))
        rows.append(("  embedded STT heard", "; ".join(repr(t) for t in heard),
                     f"{QUESTION!r}, {self.question_seconds:.2f} s", ""))
        rows += self._goal_rows()
        rows += self._load_rows()
        return rows

    def _goal_rows(self) -> list[tuple[str, str, str, str]]:
        """Issue 16's figures for the embedded stack, each beside its goal."""
        embedded = steps_spread(self.embedded.turns)["first audio"]
        load = Spread.of([s.first_audio for s in self.load.sessions
                          if s.first_audio is not None])
        n = len(self.load.sessions)
        accuracy = self.accuracy
        return [
            _goal("embedded: first audio p50", embedded.p50, GOAL_P50_MS,
                  f"n={embedded.count}, first run included"),
            _goal("embedded: first audio p99", embedded.p99, GOAL_P99_MS,
                  f"n={embedded.count}"),
            _goal("embedded: first run after start-up", self.embedded.turns[0]["first audio"],
                  GOAL_P99_MS, f"ready {self.embedded.warm_up:.1f} s after healthy"),
            _goal(f"load, {n} sessions: first audio p50", load.p50, GOAL_P50_MS,
                  f"{load.count}/{n} answered"),
            _goal(f"load, {n} sessions: first audio p99", load.p99, GOAL_P99_MS,
                  f"{load.count}/{n} answered"),
            ("embedded STT word error rate", f"{accuracy.wer:.3f}",
             ", ".join(f"{voice} {wer:.3f}" for voice, wer in accuracy.by_voice.items())
             + f"; {accuracy.utterances} utterances", ""),
            ("  its CPU per second of audio", f"{accuracy.cpu_per_audio_second:.3f} s",
             "one stream, speech and silence", ""),
        ]

    def _turn_rows(self, label: str, turns: list[dict[str, float]]) -> list[
            tuple[str, str, str, str]]:
        spreads = steps_spread(turns)
        first = spreads.pop("first audio")
        low, high = UNMUTE_MS
        verdict = "below" if first.p50 < low else "within" if first.p50 <= high else "above"
        rows = [(f"end of speech → first audio, {label}",
                 f"{first.p50:.0f} / {first.max:.0f} ms",
                 f"p50 / max, n={first.count}; Unmute {low:.0f}–{high:.0f} ms",
                 f"{verdict} Unmute's")]
        rows.append(("  each run", ", ".join(f"{turn['first audio']:.0f}" for turn in turns)
                     + " ms", "in order", ""))
        rows += [(f"  {step}", f"{spread.p50:.0f} ms", "p50 after end of speech"
                  + (f" ({spread.count} of {first.count} runs)"
                     if spread.count < first.count else ""), "")
                 for step, spread in sorted(spreads.items(), key=lambda item: item[1].p50)]
        return rows

    def _load_rows(self) -> list[tuple[str, str, str, str]]:
        load = self.load
        sessions = load.sessions
        n = len(sessions)
        answered = [s.first_audio for s in sessions if s.first_audio is not None]
        stopped = [s.stopped for s in sessions if s.stopped is not None]
        heard = [s.transcript for s in sessions if s.transcript is not None]
        named = sum("name" in t.split() for t in heard)
        lags, end = self._stt_lags, Spread.of(answered)
        gaps = Spread.of([s.gap * 1000 for s in sessions])
        prefix = f"load, {n} sessions (llm {load.llm})"
        return [
            (f"{prefix}: loop lateness", f"{load.busy.p50:.2f} / {load.busy.p99:.2f} / "
             f"{load.busy.max:.1f} ms", f"p50 / p99 / max, n={load.busy.count}", ""),
            ("  idle loop lateness (before)", f"{load.idle.p50:.2f} / {load.idle.p99:.2f} / "
             f"{load.idle.max:.1f} ms", "p50 / p99 / max", ""),
            ("  CPU: server + clients / its workers", f"{load.cpu_cores:.2f} / "
             f"{load.workers_cores:.2f} cores", f"over {load.seconds:.0f} s", ""),
            ("  transcripts arrived", f"{len(heard)}/{n}, {named} with 'name'", "", ""),
            ("  STT lag (event vs its audio sent)", f"{lags.p50:.0f} / {lags.max:.0f} ms",
             f"p50 / max, n={lags.count}", ""),
            ("  end of speech → speech_stopped", f"{Spread.of(stopped).p50:.0f} / "
             f"{Spread.of(stopped).max:.0f} ms", f"p50 / max ({PAUSE_HOLD:g} s hold)", ""),
            ("  end of speech → first audio", f"{end.p50:.0f} / {end.max:.0f} ms",
             f"p50 / max, {len(answered)}/{n} answered", ""),
            ("  reply audio gaps per session", f"{gaps.p50:.0f} / {gaps.max:.0f} ms",
             f"p50 / max; {sum(s.done for s in sessions)}/{n} replies done in "
             f"{LOAD_WINDOW:g} s", ""),
            ("  reply audio received per session",
             f"{Spread.of([s.audio for s in sessions]).p50:.1f} s", "p50", ""),
        ]


def _goal(label: str, ms: float, goal: float, note: str) -> tuple[str, str, str, str]:
    return (label, f"{ms / 1000:.2f} s", f"goal ≤ {goal / 1000:g} s; {note}",
            "ok" if ms <= goal else "SHORT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("voice loop")
    group.add_argument("--voice-runs", type=int, default=6, metavar="N",
                       help="turns with the protocol fakes (default: 6)")
    group.add_argument("--embedded-runs", type=int, default=5, metavar="N",
                       help="spoken turns with the embedded defaults (default: 5)")
    group.add_argument("--load-sessions", type=int, default=8, metavar="N",
                       help="sessions at once on the embedded STT/TTS (default: 8, "
                       "issue 16's goal)")
    group.add_argument("--load-llm", choices=("none", EMBEDDED), default="none",
                       help="language model of the load phase: the built-in responder "
                       "(default) or the embedded SmolLM2")


def run(args: argparse.Namespace) -> VoiceResults:
    log("voice, accuracy: the embedded STT on the synthesized test speech")
    accuracy = measure_accuracy()
    log(f"voice: synthesizing {QUESTION!r} with the embedded TTS")
    question = spoken_question()
    with tempfile.TemporaryDirectory(prefix="troupe-bench-voice-") as tmp:
        root = Path(tmp).resolve()
        return asyncio.run(_measure(args, root, question, accuracy))


async def _measure(args: argparse.Namespace, root: Path, question: Question,
                   accuracy: AccuracyFigures) -> VoiceResults:
    log(f"voice, fakes: {args.voice_runs} turns")
    fakes = await measure_fakes(root, args.voice_runs)
    log(f"voice, embedded: {args.embedded_runs} spoken turns")
    embedded = await measure_embedded(root, question, args.embedded_runs)
    load = await measure_load(question, args.load_sessions, args.load_llm)
    return VoiceResults(fakes, embedded, load, question.seconds, accuracy)
