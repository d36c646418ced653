"""Write a ModelProto to a file without building its whole serialization in memory.

`SerializeToString()` holds a second full copy of the model (and protobuf's `ByteSize()`
encodes everything to answer). This writer emits the main graph's initializers one at a time
and computes every length exactly from their headers and data sizes, so peak memory grows by
the largest tensor only. Fields go out in field-number order, as protobuf writes them, so the
file is byte-identical to `SerializeToString()`.
"""

from __future__ import annotations

from typing import BinaryIO

import onnx

from bnfold.onnxio.background import BackgroundWriter
from bnfold.onnxio.preallocate import reserve

try:
    from google.protobuf.unknown_fields import UnknownFieldSet
except ImportError:  # protobuf < 4.24
    UnknownFieldSet = None

_MESSAGE_TYPE = 11
_GRAPH_TAG = b"\x3a"  # ModelProto.graph: field 7, length-delimited
_INITIALIZER_TAG = b"\x2a"  # GraphProto.initializer: field 5, length-delimited
_RAW_DATA_FIELD = 9
_RAW_DATA_TAG = b"\x4a"  # TensorProto.raw_data: field 9, length-delimited
TYPED_DATA = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fill_tensor(tensor: onnx.TensorProto, values, elem_type: int) -> None:
    """Store `values` (a numpy array already rounded into elem_type's dtype, or anything with
    its shape and tobytes(), like bnfold.folding.product.WeightProduct) as raw data."""
    for field in TYPED_DATA:
        tensor.ClearField(field)
    del tensor.dims[:]
    tensor.dims.extend(values.shape)
    tensor.data_type = elem_type
    tensor.raw_data = values.tobytes()  # C order, whatever the array's layout


def serialize_whole(model: onnx.ModelProto, overrides=None) -> bytes:
    """What write_model writes (with no deferred tensors), as one protobuf serialisation of a
    copy holding the overrides: for a model small enough to hold twice, one C call instead of
    a Python step per initializer."""
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    if overrides:
        for tensor in whole.graph.initializer:
            override = overrides.get(tensor.name)
            if override is not None:
                fill_tensor(tensor, override[0], override[1])
    return whole.SerializeToString()


def _serialized_fields(source, below: int | None = None, above: int | None = None) -> bytes:
    """`source`'s fields numbered below `below` or above `above`, serialised in order."""
    target = type(source)()
    for field, value in source.ListFields():
        if below is not None and field.number >= below:
            continue
        if above is not None and field.number <= above:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == _MESSAGE_TYPE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return target.SerializeToString()


def _tensor_header(tensor: onnx.TensorProto, override=None) -> tuple[bytes, bytes]:
    """The tensor's fields before and after raw_data (field 9), serialised. `override`
    (array, elem_type) replaces dims and type."""
    before, after = onnx.TensorProto(), onnx.TensorProto()
    before.dims.extend(tensor.dims if override is None else override[0].shape)
    before.data_type = tensor.data_type if override is None else override[1]
    if tensor.HasField("segment"):
        before.segment.CopyFrom(tensor.segment)
    if tensor.HasField("name"):
        before.name = tensor.name
    if tensor.HasField("doc_string"):
        after.doc_string = tensor.doc_string
    after.external_data.extend(tensor.external_data)
    if tensor.HasField("data_location"):
        after.data_location = tensor.data_location
    after.metadata_props.extend(tensor.metadata_props)
    # unknown fields (a newer ONNX's) go last, as protobuf and serialize_whole write them
    return before.SerializeToString(), after.SerializeToString() + _unknown_bytes(tensor)


def _unknown_bytes(message) -> bytes:
    """The serialised unknown fields of `message` itself (not of its submessages)."""
    if UnknownFieldSet is not None and not len(UnknownFieldSet(message)):
        return b""
    bare = type(message)()
    bare.CopyFrom(message)  # rare (or old protobuf): only then pay for the copy
    for field, _ in bare.ListFields():
        bare.ClearField(field.name)
    return bare.SerializeToString()


def write_model(model: onnx.ModelProto, handle: BinaryIO, overrides=None, deferred=None) -> None:
    """Serialise `model` into `handle` (a file opened for binary writing).

    `overrides.get(name)` may give (array, elem_type) to write instead of a main-graph
    initializer's own data, straight from the array's buffer. A main-graph initializer with no
    data of its own whose name is in `deferred` (bnfold.onnxio.deferred.DeferredData) has its bytes
    copied from where they lie.
    """
    if not model.HasField("graph"):
        handle.write(model.SerializeToString())
        return
    graph = model.graph
    graph_number = model.DESCRIPTOR.fields_by_name["graph"].number
    initializer_number = graph.DESCRIPTOR.fields_by_name["initializer"].number
    before = _serialized_fields(graph, below=initializer_number)
    # protobuf writes unknown fields (from a newer ONNX than this onnx package) after the
    # known ones, at every level: so does this writer, so nothing is lost.
    after = _serialized_fields(graph, above=initializer_number) + _unknown_bytes(graph)
    # First pass: exact sizes (each raw_data read is a transient copy of one tensor).
    # A plan entry: (tensor, header or None for "serialise whole", size, data source)
    plan: list[tuple[onnx.TensorProto, tuple[bytes, bytes] | None, int, object]] = []
    graph_size = len(before) + len(after)
    for tensor in graph.initializer:
        override = overrides.get(tensor.name) if overrides else None
        if override is not None:
            source = override[0]
            raw_size = source.nbytes
        elif deferred is not None and deferred.holds(tensor):
            source = tensor.name
            raw_size = deferred.nbytes(tensor.name)
        else:
            # In the proto: protobuf serialises it whole (ByteSize is exact and copies nothing).
            size = tensor.ByteSize()
            plan.append((tensor, None, size, None))
            graph_size += len(_INITIALIZER_TAG) + len(varint(size)) + size
            continue
        header = _tensor_header(tensor, override)
        size = len(header[0]) + len(_RAW_DATA_TAG) + len(varint(raw_size)) + raw_size
        size += len(header[1])
        plan.append((tensor, header, size, source))
        graph_size += len(_INITIALIZER_TAG) + len(varint(size)) + size
    head = _serialized_fields(model, below=graph_number) + _GRAPH_TAG + varint(graph_size)
    tail = _serialized_fields(model, above=graph_number) + _unknown_bytes(model)
    reserve(handle, len(head) + graph_size + len(tail))
    if not any(hasattr(source, "chunks") for _, _, _, source in plan):
        _write_planned(handle, head, before, plan, after, tail, deferred)
        return
    # Weights computed as they are written: compute the next while one is written
    out = BackgroundWriter(handle)
    try:
        _write_planned(out, head, before, plan, after, tail, deferred)
    except BaseException:
        out.close(abort=True)
        raise
    out.close()


def _write_planned(out, head, before, plan, after, tail, deferred) -> None:
    out.write(head)
    out.write(before)
    for tensor, header, size, source in plan:
        out.write(_INITIALIZER_TAG + varint(size))
        if header is None:
            out.write(tensor.SerializeToString())
            continue
        if isinstance(source, str):
            out.write(header[0] + _RAW_DATA_TAG + varint(deferred.nbytes(source)))
            if isinstance(out, BackgroundWriter):
                out.call(lambda handle, name=source: deferred.copy_to(name, handle))
            else:
                deferred.copy_to(source, out)
        else:
            out.write(header[0] + _RAW_DATA_TAG + varint(source.nbytes))
            write_values(out, source)
        out.write(header[1])
    out.write(after)
    out.write(tail)


def write_values(handle: BinaryIO, values) -> None:
    """Write `values` (C order): an array's buffer, or the chunks of something that computes
    its values as they are written (bnfold.folding.product.WeightProduct)."""
    chunks = getattr(values, "chunks", None)
    if chunks is None:
        handle.write(memoryview(values).cast("B"))
        return
    if isinstance(handle, BackgroundWriter):
        for chunk in chunks(take=handle.take):
            handle.write_taken(chunk)
        return
    for chunk in chunks():
        handle.write(chunk)


# ---- reading ------------------------------------------------------------------------------


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int):
    """(field number, start of the field's tag, start of its payload, end) for each field."""
    pos = start
    while pos < end:
        tag_start = pos
        key, pos = _read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos, end)
            payload = pos
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 2:
            length, payload = _read_varint(data, pos, end)
            pos = payload + length
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end or number == 0:
            raise WireError("field runs past the end of its message")
        yield number, tag_start, payload, pos


def read_model(
    data: memoryview, release=None, spans: dict | None = None, defer_min_bytes: int = 4096
) -> onnx.ModelProto:
    """Parse a ModelProto from `data`, the main graph's initializers one at a time.

    `release(end)` is called as parsing moves past byte `end`, so the caller can drop the
    source pages already consumed (a memory map's) and never hold the file and the parsed
    model in full at once. Equal to `ModelProto.FromString(data)`, except that with `spans`
    a main-graph initializer holding at least `defer_min_bytes` of raw_data is parsed without
    it, and `spans[name] = (offset, length)` says where its bytes lie in `data`.
    """
    model = onnx.ModelProto()
    graph_number = model.DESCRIPTOR.fields_by_name["graph"].number
    initializer_number = model.graph.DESCRIPTOR.fields_by_name["initializer"].number

    def read_initializer(payload: int, field_end: int) -> None:
        graph = model.graph
        deferred = None
        if spans is not None:
            deferred = _without_raw_data(data, payload, field_end, defer_min_bytes)
        if deferred is not None and deferred[0].name not in spans:
            graph.initializer.append(deferred[0])
            spans[deferred[0].name] = deferred[1:]
        else:
            graph.initializer.add().ParseFromString(data[payload:field_end])
        if release is not None:
            release(field_end)

    def large(payload: int, field_end: int) -> bool:
        # Only initializers that may be deferred are read one at a time; small ones (most of a
        # graph-heavy model's) join the runs that protobuf's C parser merges in one call.
        return spans is None or field_end - payload >= defer_min_bytes

    def read_graph(payload: int, field_end: int) -> None:
        _merge_around(model.graph, data, payload, field_end, initializer_number,
                      read_initializer, large)

    _merge_around(model, data, 0, len(data), graph_number, read_graph)
    return model


def _merge_around(message, data: memoryview, start: int, end: int, number: int, read,
                  select=None) -> None:
    """Merge data[start:end] into `message` in runs of consecutive fields, except each field
    `number` (that `select(payload, end)` accepts, when given), whose (payload start, end) goes
    to `read` in order (protobuf's merge order)."""
    run_start = None
    for field, tag_start, payload, field_end in _fields(data, start, end):
        if field != number or (select is not None and not select(payload, field_end)):
            run_start = tag_start if run_start is None else run_start
            continue
        if run_start is not None:
            message.MergeFromString(data[run_start:tag_start])
            run_start = None
        read(payload, field_end)
    if run_start is not None:
        message.MergeFromString(data[run_start:end])


# TensorProto fields a deferred tensor may carry: the writer rebuilds exactly these around
# raw_data, so a tensor with any other (unknown) field is parsed whole instead.
_HEADER_FIELDS = {1, 2, 3, 8, 12, 13, 14, 16}


def _without_raw_data(
    data: memoryview, start: int, end: int, min_bytes: int
) -> tuple[onnx.TensorProto, int, int] | None:
    """The TensorProto in data[start:end] parsed without its raw_data, with that field's
    offset and length; None when it is not one plain raw tensor of at least `min_bytes`."""
    raw = None
    for number, tag, payload, field_end in _fields(data, start, end):
        if number == _RAW_DATA_FIELD:
            if raw is not None:  # repeated raw_data: protobuf keeps the last; parse it normally
                return None
            raw = (tag, payload, field_end)
        elif number not in _HEADER_FIELDS:
            return None
    if raw is None or raw[2] - raw[1] < min_bytes:
        return None
    tensor = onnx.TensorProto()
    tensor.MergeFromString(data[start:raw[0]])
    tensor.MergeFromString(data[raw[2]:end])
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.name:
        return None
    return tensor, raw[1], raw[2] - raw[1]
