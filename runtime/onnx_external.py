"""The external-data file names an ONNX model refers to, read straight from its protobuf wire format.

An artifact is untrusted (it travels between CI jobs, caches and services), and ONNX Runtime opens whatever
file a tensor's `external_data` `location` names, `../../etc/shadow` included. The names must therefore be
checked before the model is opened, and the runtime never imports onnx (ARCHITECTURE.md): so this follows
only the few fields that lead from the model to a tensor (graphs, nodes, attributes, functions, sparse
tensors; field numbers from onnx.proto) and skips every other field by its length, weights included.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# message -> {field number: the message it holds}, for the fields on the way to a TensorProto's external_data.
FIELDS_TOWARDS_TENSORS = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "function": {7: "node", 11: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
    "tensor": {13: "external_data_entry"},
}
ENTRY_KEY, ENTRY_VALUE = 1, 2
LENGTH_DELIMITED, START_GROUP, END_GROUP = 2, 3, 4


class MalformedModel(ValueError):
    """The bytes are not a protobuf message (truncated, or not an ONNX file at all). The walk accepts every
    valid encoding protobuf does (groups included), so a file it calls malformed is one ONNX Runtime's parser
    refuses too: it can name no external data that ONNX Runtime would open."""


def external_data_locations(path: Path) -> list[str]:
    """Every `location` of external data named anywhere in the model file, in file order, repeats included."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            return []
        # mmap: a model with inline weights can be gigabytes; only the bytes of the fields followed are read.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _locations(data)


def _locations(data) -> list[str]:
    found = []
    pending = [("model", 0, len(data))]  # a stack, not recursion: nesting depth is the file's to choose
    while pending:
        kind, start, end = pending.pop()
        if kind == "external_data_entry":
            location = _location_of_entry(data, start, end)
            if location is not None:
                found.append(location)
            continue
        inner = FIELDS_TOWARDS_TENSORS[kind]
        children = [(inner[number], begin, stop) for number, wire, begin, stop in _fields(data, start, end)
                    if number in inner and wire == LENGTH_DELIMITED]
        pending.extend(reversed(children))  # keeps file order when popped
    return found


def _location_of_entry(data, start: int, end: int) -> str | None:
    """The value of a StringStringEntryProto whose key is 'location' (the others are offset, length, checksum)."""
    entry = {number: bytes(data[begin:stop]) for number, wire, begin, stop in _fields(data, start, end)
             if wire == LENGTH_DELIMITED}
    if entry.get(ENTRY_KEY) != b"location":
        return None
    # onnx.proto is proto2, whose parser takes any bytes as a string: decode them as the OS would read the path.
    return os.fsdecode(entry.get(ENTRY_VALUE, b""))


def _fields(data, pos: int, end: int):
    """(field number, wire type, payload start, payload end) of each field of the message in data[pos:end]."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
            begin = pos
        elif wire in (1, 5):
            begin = pos = pos + (8 if wire == 1 else 4)
        elif wire == LENGTH_DELIMITED:
            length, begin = _varint(data, pos, end)
            pos = begin + length
        elif wire == START_GROUP:  # unused by onnx.proto, but valid protobuf that its parser skips: so do we
            begin = pos
            pos = _skip_group(data, pos, end, number)
        else:
            raise MalformedModel(f"field {number} has wire type {wire}, which protobuf does not have here")
        if pos > end:
            raise MalformedModel(f"field {number} runs past the end of its message (a truncated file?)")
        yield number, wire, begin, pos


def _skip_group(data, pos: int, end: int, number: int) -> int:
    """The position after the end-group tag that closes the group `number` opened just before `pos`."""
    while pos < end:
        key, after = _varint(data, pos, end)
        if key == (number << 3) | END_GROUP:
            return after
        pos = next(_fields(data, pos, end))[3]  # one field (a nested group included), whatever its type
    raise MalformedModel(f"group {number} is not closed (a truncated file?)")


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise MalformedModel("a varint runs past the end of its message (a truncated file?)")
