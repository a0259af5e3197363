"""The one accuracy record every gate writes, its one formatter, and the report that carries it (fast: no model)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from export import report
from runtime import artifact as artifacts
from runtime.accuracy import HELD_OUT, AccuracyRecord, Evaluation, as_metrics, held_out, records_of, records_text


def evaluation(perplexity: float, predictions: list[list[int]]) -> Evaluation:
    return Evaluation(perplexity, [np.array(p, np.int32) for p in predictions])


def test_a_record_compares_an_evaluation_with_its_reference_and_judges_it_by_the_limit():
    reference = evaluation(20.0, [[1, 2, 3, 4], [5, 6, 7, 8]])
    candidate = evaluation(20.5, [[1, 2, 3, 0], [5, 6, 7, 8]])
    record = AccuracyRecord.of("calibrate", "fp32", candidate, reference, limit=3.0)
    assert record.perplexity_increase_percent == pytest.approx(2.5) and record.top1_agreement == 7 / 8
    assert record.passed and record.windows == 2 and record.domain == HELD_OUT
    assert not AccuracyRecord.of("calibrate", "fp32", candidate, reference, limit=2.0).passed
    assert AccuracyRecord.of("prune", "parent", candidate, reference).passed  # no limit: nothing to miss
    # A gate with its own rule (fp16's is two-sided) says so.
    assert not AccuracyRecord.of("fp16", "fp32", candidate, reference, limit=3.0, passed=False).passed


def test_the_manifest_form_round_trips_and_carries_the_increase_ready():
    record = AccuracyRecord("engine", "fp32", True, perplexity=11.0, reference_perplexity=10.0, top1_agreement=0.9,
                            logits_diff=0.2, logits_statistic="mean", logits_limit=1.0, ppl_limit_percent=10.5,
                            windows=4, domain="code")
    (entry,) = as_metrics([record])
    assert entry["perplexity_increase_percent"] == pytest.approx(10.0)
    assert json.loads(json.dumps(entry)) == entry  # plain JSON, as manifests and report.json hold it
    assert records_of({"accuracy": [entry]}) == [record]
    assert records_of({"distillation": {}}) == []


def test_one_line_names_the_reference_the_figures_the_limits_and_a_miss():
    gated = AccuracyRecord("calibrate", "fp32", True, perplexity=20.5, reference_perplexity=20.0,
                           top1_agreement=0.912, ppl_limit_percent=3.0)
    assert gated.text() == "vs fp32: ppl 20.00 -> 20.50 (+2.50%, limit 3%), top-1 0.912"
    parity = AccuracyRecord("export", "pytorch", False, top1_agreement=0.5, logits_diff=2e-3, logits_limit=1e-3,
                            domain="parity prompt")
    assert parity.text() == "vs pytorch on parity prompt: top-1 0.500, max|dlogits| 2.0e-03 (limit 0.001), missed"
    assert records_text([gated, parity]) == f"{gated.text()}; {parity.text()}"
    assert records_text([]) == "-"


def test_the_held_out_record_is_found_among_several_domains():
    code = AccuracyRecord("engine", "fp32", True, perplexity=3.0, reference_perplexity=2.0, domain="code")
    prose = AccuracyRecord("engine", "fp32", True, perplexity=2.2, reference_perplexity=2.0)
    assert held_out([code, prose]) is prose and held_out([code]) is None


def stage(tmp_path, stage_name: str, ident: str, parent: str | None, records: list[AccuracyRecord]):
    art = artifacts.Artifact(tmp_path / ident, {"id": ident, "stage": stage_name, "parent": parent,
                                                "precision": "int8", "files": {"model.onnx": {"size": 1000}},
                                                "metrics": {"accuracy": as_metrics(records)}})
    return SimpleNamespace(stage=stage_name, artifact=art, seconds=1.0, reused=False)


def test_report_json_holds_every_stages_records_in_one_shape_and_report_md_formats_them_once(tmp_path):
    parity = AccuracyRecord("export", "pytorch", True, top1_agreement=1.0, logits_diff=1e-5, domain="parity prompt")
    gate = AccuracyRecord("calibrate", "fp32", True, perplexity=10.3, reference_perplexity=10.0, ppl_limit_percent=3)
    checks = [AccuracyRecord("engine", "fp32", True, perplexity=10.4, reference_perplexity=10.0, top1_agreement=0.93),
              AccuracyRecord("engine", "fp32", False, perplexity=13.0, reference_perplexity=10.0, domain="code")]
    results = [stage(tmp_path, "export", "e0", None, [parity]), stage(tmp_path, "calibrate", "c0", "e0", [gate]),
               stage(tmp_path, "engine", "g0", "c0", checks)]
    built = report.build_report(results, "tiny", {}, 1.0)
    assert built["schema_version"] == 2
    assert [records_of(s) for s in built["stages"]] == [[parity], [gate], checks]
    (engine,) = built["engines"]
    assert records_of(engine) == checks
    text = report.markdown(built, [], None)
    for result in results:  # each stage's records in its row, the table's own bars escaped
        assert f"| {records_text(records_of(result.artifact.metrics)).replace('|', chr(92) + '|')} |" in text
    assert "max\\|dlogits\\| 1.0e-05" in text
    assert "| int8 | `g0` | 0.0 MB | +4.00% | 0.930 |" in text  # the engines table reads the held-out record
