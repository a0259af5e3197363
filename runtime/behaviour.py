"""The behaviour check: short questions with checkable answers (facts, arithmetic, following a format), answered
greedily through a model's chat template, and the agreement between a built model's answers and the unpruned
model's. Perplexity says how well a model predicts text; this says whether it still answers as it did ("The
capital of France is indeed France." can cost little perplexity).

Two answers agree when both are right or both are wrong (the check reads an answer's first line). The probes
are ones the unpruned model gets right, so agreement is mostly "still right"; comparing wrong answers' wording
instead would count a reworded sentence as lost behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.generate import GenerationConfig, generate


@dataclass(frozen=True)
class Probe:
    question: str
    answer: str  # a regular expression the right answer matches (case-insensitive)


# Written for lmforge: questions a 135M instruct model answers right in its first line when unpruned.
PROBES = (
    Probe("What is the capital of France? Answer in one word.", r"\bparis\b"),
    Probe("What is the capital of Japan? Answer in one word.", r"\btokyo\b"),
    Probe("What is the capital of Italy? Answer in one word.", r"\brome\b"),
    Probe("What is the capital of Germany? Answer in one word.", r"\bberlin\b"),
    Probe("What is the capital of Spain? Answer in one word.", r"\bmadrid\b"),
    Probe("Which planet is known as the Red Planet?", r"\bmars\b"),
    Probe("What is the chemical symbol for water?", r"\bh2o\b"),
    Probe("How many days are in a week? Answer with a number.", r"\b7\b|\bseven\b"),
    Probe("How many months are in a year? Answer with a number.", r"\b12\b|\btwelve\b"),
    Probe("How many legs does a spider have? Answer with a number.", r"\b8\b|\beight\b"),
    Probe("What color is the sky on a clear day? Answer in one word.", r"\bblue\b"),
    Probe("What is the opposite of hot? Answer in one word.", r"\bcold\b"),
    Probe("What is the plural of mouse?", r"\bmice\b"),
    Probe("What is the capital of England? Answer in one word.", r"\blondon\b"),
    Probe("What is 2 + 2? Answer with a number only.", r"\b4\b|\bfour\b"),
    Probe("What is 5 + 3? Answer with a number only.", r"\b8\b|\beight\b"),
    Probe("What is 3 times 3? Answer with a number only.", r"\b9\b|\bnine\b"),
    Probe("What is 20 minus 8? Answer with a number only.", r"\b12\b|\btwelve\b"),
    Probe("Who wrote Romeo and Juliet?", r"shakespeare"),
    Probe("Who painted the Mona Lisa?", r"leonardo|da vinci"),
    Probe("What is the boiling point of water in degrees Celsius?", r"\b100\b"),
    Probe("Translate 'hello' into Spanish.", r"\bhola\b"),
    Probe("Write the numbers from 1 to 5 separated by commas.", r"1,\s*2,\s*3,\s*4,\s*5"),
    Probe("What is 6 + 4? Answer with a number only.", r"\b10\b|\bten\b"),
)
ANSWER_TOKENS = 32  # enough for a sentence; the check reads the first line


@dataclass(frozen=True)
class Answers:
    texts: tuple[str, ...]  # one per probe, in PROBES order

    def right(self) -> tuple[bool, ...]:
        return tuple(_is_right(probe, text) for probe, text in zip(PROBES, self.texts))

    def agreement(self, reference: Answers) -> float:
        """The share of probes this model gets right or wrong as `reference` did."""
        return sum(mine == theirs for mine, theirs in zip(self.right(), reference.right())) / len(PROBES)

    def summary(self, reference: Answers) -> dict:
        return {"answer_agreement": self.agreement(reference), "answers_right": sum(self.right()),
                "reference_answers_right": sum(reference.right()), "probes": len(PROBES)}


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def _is_right(probe: Probe, text: str) -> bool:
    return re.search(probe.answer, _first_line(text), re.IGNORECASE) is not None


def answer(session, codec) -> Answers:
    """Every probe answered greedily through the model's chat template, one at a time: any engine runs batch 1
    (a TensorRT plan may take no more), and no answer depends on another's padding."""
    config = GenerationConfig(max_new_tokens=ANSWER_TOKENS)
    texts = []
    for probe in PROBES:
        prompt = codec.encode(codec.render_chat([{"role": "user", "content": probe.question}]))
        texts.append(codec.decode(generate(session, [prompt], config).tokens[0]))
    return Answers(tuple(texts))
