"""Teacher text: the unpruned model writes distillation and evaluation text of its own, so healing and the
accuracy gates see what the model is used for, not only the calibration text's one domain.

The teacher is the export artifact (the unpruned model in ONNX) run through lmforge's runtime: each built-in
seed prompt goes through the model's chat template and is answered by sampling (temperature and top-p as
chat services use them, a fixed seed so the text is reproducible). The answers are a stage artifact like any
other, so a rebuild reuses them. Why sampled chat answers: they cover instructions, questions, stories, code
and lists in the model's own distribution, which is what a distilled student must keep; the documentation text
is mixed in beside them (export/graph/data.py) because it anchors long-range prose.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from runtime.artifact import Artifact, ArtifactWriter
from runtime.ranges import check_ranges, ranged

STAGE = "teacher"
GENERATIONS_FILE = "generations.jsonl"

# Varied on purpose (instructions, questions, stories, code, lists, explanations, advice); written for lmforge.
SEED_PROMPTS = (
    "Write a short story about a fox who learns to swim.",
    "Explain how a rainbow forms, in simple terms.",
    "Give me a list of five healthy breakfast ideas.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main differences between a virus and a bacterium?",
    "Summarize the plot of a classic fairy tale of your choice in four sentences.",
    "How do I make a cup of green tea properly?",
    "Write a polite email asking a colleague to review a document by Friday.",
    "What causes the seasons on Earth?",
    "List three tips for staying focused while studying.",
    "Write a haiku about autumn leaves.",
    "Explain what a for loop does in programming, with an example.",
    "Why do cats purr?",
    "Describe the water cycle step by step.",
    "Write a JavaScript function that returns the largest number in an array.",
    "What should I pack for a weekend hiking trip?",
    "Tell me a fun fact about octopuses.",
    "Explain the difference between a lake and a sea.",
    "Write a short poem about the ocean at night.",
    "How does a bicycle stay upright when it moves?",
    "Give step-by-step instructions for planting a tomato seedling.",
    "What is photosynthesis and why is it important?",
    "Write a SQL query that counts the orders per customer in a table called orders.",
    "Suggest a name for a small bakery and explain why it fits.",
    "What are some good ways to save money on groceries?",
    "Explain what gravity is to a ten-year-old.",
    "Write a dialogue between a customer and a waiter at a restaurant.",
    "List the planets of the solar system in order from the Sun.",
    "How can I improve my sleep?",
    "Describe a busy market on a Saturday morning.",
    "Write a function in Python that returns the Fibonacci numbers below 100.",
    "What is the difference between a noun and a verb? Give examples.",
    "Explain how vaccines help the immune system.",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Write a thank-you note to a teacher.",
    "Why is the sky blue?",
    "Explain the rules of tic-tac-toe.",
    "What are the benefits of regular exercise?",
    "Write a recipe for a simple vegetable soup.",
    "How does a refrigerator keep food cold?",
    "Tell a short story about a robot learning to paint.",
    "Compare trains and planes for a 500-kilometre trip.",
    "What does a computer's memory do, and how is it different from storage?",
    "Write a limerick about a forgetful wizard.",
    "List five common houseplants that are easy to care for.",
    "Explain what an API is, with an everyday analogy.",
    "How should I prepare for a job interview?",
    "Describe how bees make honey.",
)


@dataclass(frozen=True)
class TeacherConfig:
    # Seed prompts answered (the first n of the built-in set); 0 turns teacher text off.
    prompts: int = ranged(len(SEED_PROMPTS), "--teacher-prompts", low=0, high=len(SEED_PROMPTS))
    # Tokens per answer at most: long enough for a paragraph, short enough to generate in about a minute.
    max_new_tokens: int = 192
    # Sampling as a chat service would: varied text from the model's own distribution, without its tail.
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0
    # Prompts generated together (one left-padded batch through the runtime).
    batch: int = ranged(16, "teacher batch", low=1)

    def __post_init__(self):
        check_ranges(self)


def stage_config(config: TeacherConfig) -> dict[str, Any]:
    return asdict(config)


def run(export: Artifact, writer: ArtifactWriter, config: TeacherConfig, threads: int, progress=print) -> Artifact:
    """Answer the seed prompts with the export and write them as `generations.jsonl` (prompt, response)."""
    started = time.perf_counter()
    conversations, generated = answer_prompts(export, config, threads, progress)
    with open(writer.dir / GENERATIONS_FILE, "w") as out:
        for prompt, response in conversations:
            out.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    writer.copy_text_files(export)
    seconds = time.perf_counter() - started
    progress(f"[{STAGE}] {len(conversations)} answers, {generated} tokens in {seconds:.0f}s")
    metrics = {"answers": len(conversations), "generated_tokens": generated, "generation_seconds": round(seconds, 1)}
    return writer.commit(io=export.io, metrics=metrics)


def answer_prompts(export: Artifact, config: TeacherConfig, threads: int, progress=print
                   ) -> tuple[list[tuple[str, str]], int]:
    """(prompt, response) per seed prompt, and the number of tokens generated."""
    import runtime
    from runtime.generate import GenerationConfig, generate
    from runtime.session import SessionOptions
    from runtime.text import load_codec

    codec = load_codec(export)
    prompts = list(SEED_PROMPTS[: config.prompts])
    conversations, generated = [], 0
    with runtime.open(export, SessionOptions(threads=threads)) as session:
        for first in range(0, len(prompts), config.batch):
            group = prompts[first: first + config.batch]
            progress(f"[{STAGE}] answering prompts {first + 1}-{first + len(group)} of {len(prompts)}")
            ids = [codec.encode(codec.render_chat([{"role": "user", "content": p}])) for p in group]
            context = export.model_facts.get("max_context")
            room = config.max_new_tokens if not context else min(config.max_new_tokens, context - max(map(len, ids)))
            sampling = GenerationConfig(max_new_tokens=max(1, room),
                                        temperature=config.temperature,
                                        top_k=config.top_k, top_p=config.top_p, seed=config.seed + first)
            for prompt, tokens in zip(group, generate(session, ids, sampling).tokens):
                generated += len(tokens)
                conversations.append((prompt, codec.decode(tokens).strip()))
    return conversations, generated


def conversations(teacher: Artifact) -> list[dict[str, str]]:
    """The teacher artifact's (prompt, response) records."""
    lines = teacher.file(GENERATIONS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
