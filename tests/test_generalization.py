"""Accuracy beyond the calibration text: the teacher's own answers as a second domain, and the behaviour check."""

from __future__ import annotations

import pytest

import runtime
from export import teacher
from export.graph.data import DataConfig, teacher_documents, teacher_samples
from runtime import behaviour
from runtime.session import SessionOptions
from runtime.text import load_codec

SMALL_TEACHER = teacher.TeacherConfig(prompts=4, max_new_tokens=12, batch=2)


def answers_with(right: set[int]) -> behaviour.Answers:
    """Answers that are right exactly on the probes in `right` (each probe's question echoed otherwise)."""
    texts = []
    for i in range(len(behaviour.PROBES)):
        texts.append(RIGHT_ANSWERS[i] if i in right else "I am not sure.")
    return behaviour.Answers(tuple(texts))


# One right first line per probe, written to match each probe's check.
RIGHT_ANSWERS = ("Paris.", "Tokyo", "It is Rome.", "Berlin", "Madrid!", "Mars is the red planet.", "H2O",
                 "A week has 7 days.", "12", "Eight legs.", "Blue", "cold", "mice", "London.", "4", "8", "9", "12",
                 "William Shakespeare", "Leonardo da Vinci", "100 degrees", "Hola", "1, 2, 3, 4, 5", "10")


def test_every_probe_has_a_right_answer_that_its_check_accepts():
    assert len(RIGHT_ANSWERS) == len(behaviour.PROBES)
    assert answers_with(set(range(len(behaviour.PROBES)))).right() == (True,) * len(behaviour.PROBES)
    assert not any(answers_with(set()).right())


def test_the_check_reads_the_first_line_only():
    late = behaviour.Answers(("I think...\nParis",) + RIGHT_ANSWERS[1:])
    assert late.right()[0] is False


def test_agreement_counts_probes_answered_right_or_wrong_alike():
    everything = set(range(len(behaviour.PROBES)))
    reference = answers_with(everything - {0, 1})
    same = answers_with(everything - {0, 1})
    assert same.agreement(reference) == 1.0
    lost_paris = answers_with(everything - {0, 1, 2})  # "The capital of France is indeed France."
    assert lost_paris.agreement(reference) == pytest.approx(1 - 1 / len(behaviour.PROBES))
    fixed_one = answers_with(everything - {0})  # a changed answer is a change, even a right one
    assert fixed_one.agreement(reference) == pytest.approx(1 - 1 / len(behaviour.PROBES))
    summary = lost_paris.summary(reference)
    assert summary["answers_right"] == len(behaviour.PROBES) - 3
    assert summary["reference_answers_right"] == len(behaviour.PROBES) - 2


def test_answers_are_greedy_and_repeatable(chat_export):
    codec = load_codec(chat_export)
    with runtime.open(chat_export, SessionOptions(threads=1)) as session:
        first, second = behaviour.answer(session, codec), behaviour.answer(session, codec)
    assert len(first.texts) == len(behaviour.PROBES)
    assert first == second
    assert first.agreement(second) == 1.0


def test_teacher_answers_are_reproducible_with_a_seed_and_change_with_another(chat_export):
    one, tokens = teacher.answer_prompts(chat_export, SMALL_TEACHER, threads=1, progress=lambda _: None)
    again, _ = teacher.answer_prompts(chat_export, SMALL_TEACHER, threads=1, progress=lambda _: None)
    other, _ = teacher.answer_prompts(chat_export, SMALL_TEACHER.__class__(**{**SMALL_TEACHER.__dict__, "seed": 1}),
                                      threads=1, progress=lambda _: None)
    assert [p for p, _ in one] == list(teacher.SEED_PROMPTS[:4])
    assert 0 < tokens <= 4 * SMALL_TEACHER.max_new_tokens
    assert one == again
    assert one != other


def test_teacher_text_splits_by_prompt_into_training_and_held_out_windows(chat_export):
    codec = load_codec(chat_export)
    generations = [{"prompt": p, "response": f"answer number {i} " * 20} for i, p in enumerate(teacher.SEED_PROMPTS)]
    documents = teacher_documents(generations, codec)
    assert len(documents) == len(generations)
    assert all("assistant: answer number" in text for text in documents.values())  # through the chat template
    samples = teacher_samples(generations, DataConfig(seq_len=16, samples=1000, eval_samples=1000), codec, [2])
    assert samples.calibration.shape[1] == samples.evaluation.shape[1] == 16
    assert len(samples.calibration) > len(samples.evaluation) > 0
    held_out = teacher_samples(generations[:-1], DataConfig(seq_len=16, samples=1000, eval_samples=1000), codec, [2])
    assert (held_out.evaluation == samples.evaluation[: len(held_out.evaluation)]).all()  # a new prompt moves none
