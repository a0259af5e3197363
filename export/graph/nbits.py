"""Clean-ups of ONNX Runtime's MatMulNBits (com.microsoft) once its offline optimizer has made them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

ZERO_POINTS = 3  # MatMulNBits' optional zero-points input
# A zero-point byte that holds only the kernel's default (2^(bits-1) in every field), per bit width; only the
# widths whose fields fill a byte exactly, so no padding field can differ.
DEFAULT_ZERO_POINT_BYTE = {8: 0x80, 4: 0x88, 2: 0xAA}


def _default_zero_points(node: ir.Node) -> ir.Value | None:
    """The node's zero-points input if it only spells out the default, else None."""
    if len(node.inputs) <= ZERO_POINTS or node.inputs[ZERO_POINTS] is None:
        return None
    value = node.inputs[ZERO_POINTS]
    byte = DEFAULT_ZERO_POINT_BYTE.get(node.attributes.get_int("bits", 4))
    if byte is None or value.const_value is None or value.dtype != ir.DataType.UINT8:
        return None
    return value if bool(np.all(value.const_value.numpy() == byte)) else None


class DropDefaultZeroPointsPass(ir.passes.InPlacePass):
    """Removes MatMulNBits zero points that equal the kernel's default (the symmetric grid). ONNX Runtime's Q/DQ
    fusion writes them out even then, and its CPU kernel takes its asymmetric path for any zero-points input: a
    128-token prefill chunk's 8-bit down projections take about 1.5x as long with them. The outputs are the
    same bits either way (tests/test_engines.py)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
                continue
            value = _default_zero_points(node)
            if value is None:
                continue
            if len(node.inputs) == ZERO_POINTS + 1:
                node.resize_inputs(ZERO_POINTS)
            else:
                node.replace_input_with(ZERO_POINTS, None)  # later optional inputs (g_idx, bias) keep their place
            if not value.uses() and value.name in model.graph.initializers:
                del model.graph.initializers[value.name]
            modified = True
        return ir.passes.PassResult(model, modified)
