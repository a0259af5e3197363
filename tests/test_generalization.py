"""Accuracy beyond the calibration text: the teacher's own answers as a second domain, and the behaviour check."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
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


def test_a_gate_that_holds_on_one_domain_fails_on_another():
    from export import distill
    from runtime.errors import AccuracyError

    windows = {"held-out": np.zeros((4, 8)), "teacher-answers": np.zeros((2, 8))}
    teacher_ppl = {"held-out": 10.0, "teacher-answers": 10.0}
    healed = {"held-out": 10.2, "teacher-answers": 11.5}  # +2% in domain, +15% beyond it
    gate = distill.DistillConfig(steps=1, max_increase=5.0)
    with pytest.raises(AccuracyError, match=r"\+15\.00% on teacher-answers"):
        distill.healed_records(healed, teacher_ppl, windows, gate)
    records = distill.healed_records(healed, teacher_ppl, windows, replace(gate, allow_accuracy_loss=True))
    assert [(r.domain, r.passed) for r in records] == [("held-out", True), ("teacher-answers", False)]
    assert "on teacher-answers" in records[1].text() and records[1].text().endswith("missed")


def test_the_worst_domain_is_what_a_search_judges():
    from runtime.accuracy import Evaluation, domain_records, worst_increase

    def evaluation(perplexity):
        return Evaluation(perplexity, [np.zeros(3, np.int32)])

    reference = {"held-out": evaluation(10.0), "teacher-answers": evaluation(20.0)}
    candidate = {"held-out": evaluation(10.1), "teacher-answers": evaluation(22.0)}
    assert worst_increase(candidate, reference) == pytest.approx(10.0)
    records = domain_records("calibrate", "fp32", candidate, reference, limit=3.0)
    assert [r.passed for r in records] == [True, False]


def test_balanced_mix_takes_half_of_each_domain_whatever_their_sizes():
    from export.graph.data import balanced_mix

    docs, answers = np.arange(10)[:, None] * np.ones((1, 4), np.int64), -np.arange(1, 3)[:, None] * np.ones((1, 4),
                                                                                                              np.int64)
    mixed = balanced_mix(docs, answers)
    assert len(mixed) == len(docs)
    assert (mixed[0::2, 0] == np.arange(5)).all() and (mixed[1::2, 0] == [-1, -2, -1, -2, -1]).all()


def test_a_chat_model_build_reports_every_gate_on_both_domains_and_the_behaviour_check(chat_export):
    """The tiny chat model's fp32 build: the teacher stage answers, and the engine's records cover the held-out
    text, the teacher's answers and the behaviour probes (an fp32 engine answers exactly as its export)."""
    from runtime import accuracy as acc

    store = chat_export.path.parent
    teacher_artifacts = [p for p in store.iterdir() if p.name.startswith("teacher-")]
    assert len(teacher_artifacts) == 1
    records = acc.records_of(chat_export.metrics)
    assert {r.domain for r in records} == {"held-out", "teacher-answers", "behaviour probes"}
    behaviour_record = next(r for r in records if r.domain == "behaviour probes")
    assert behaviour_record.answer_agreement == 1.0 and behaviour_record.passed


def test_the_healing_gate_measures_on_the_windows_every_other_gate_measures_on(chat_export, tmp_path):
    from types import SimpleNamespace

    from export.build import distillation_text, parse_args
    from export.graph.data import stage_text

    generations = [{"prompt": p, "response": f"answer number {i} " * 40} for i, p in enumerate(teacher.SEED_PROMPTS)]
    config = parse_args(["--model", str(chat_export.path), "--prune", "mlp=0.25", "--distill-steps", "1",
                         "--calib-seq-len", "24", "--eval-samples", "3", "--out", str(tmp_path)])
    train, domains = distillation_text(config, chat_export, SimpleNamespace(generations=generations))
    _, gates = stage_text(config.calibration.data, chat_export, generations, fit_on_teacher=True)
    assert domains.keys() == gates.keys() and len(domains) == 2
    assert all(np.array_equal(domains[name], gates[name]) for name in gates)  # the prune and calibrate gates'
    assert train.shape[1] != gates["held-out"].shape[1]  # training windows keep distillation's own length
