"""Passes run in a row, as onnx-ir's `Sequential`, keeping what each pass reported."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass
class SequenceResult(ir.passes.PassResult):
    steps: tuple[ir.passes.PassResult, ...] = ()  # each pass's own result, in order (its counts, its names)


class PassSequence(ir.passes.Sequential):
    """`ir.passes.Sequential` (in-place when every pass is, each pass's requires/ensures checked), except that
    it returns every pass's result and lets a pass's error through as it was raised: Sequential keeps only the
    combined `modified` flag and wraps every error in a PassError, and our passes' errors are the messages the
    user reads (PruningError and PreconditionError say what to change)."""

    def call(self, model: ir.Model) -> SequenceResult:
        steps = []
        for step in self.passes:
            result = step(model)
            model = result.model
            steps.append(result)
        return SequenceResult(model, any(result.modified for result in steps), steps=tuple(steps))
