"""The streaming reader and writer are exact: byte-identical output, equal parsed models."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.onnxio.stream import WireError, read_model, write_model
from bnfold.sample_model import build_sample_model


def _model_with_everything() -> onnx.ModelProto:
    m = build_sample_model()
    m.doc_string = "doc"
    m.metadata_props.add(key="k", value="v")
    m.graph.doc_string = "graph doc"
    then = helper.make_graph([helper.make_node("Identity", ["input"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.ones(300, np.float32), "inner")])
    m.graph.node.append(helper.make_node("If", ["c"], ["u"], then_branch=then, else_branch=then))
    m.graph.initializer.append(numpy_helper.from_array(np.arange(5, dtype=np.int64), "ints"))
    m.graph.initializer.append(onnx.helper.make_tensor("floats", onnx.TensorProto.FLOAT, [2], [1.0, 2.0]))
    # Fields on both sides of raw_data (9): doc_string 12, data_location 14, metadata_props 16.
    tensor = m.graph.initializer[0]
    tensor.doc_string = "weights"
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.metadata_props.add(key="origin", value="test")
    return m


def test_writer_is_byte_identical_to_serialize():
    m = _model_with_everything()
    buffer = io.BytesIO()
    write_model(m, buffer)
    assert buffer.getvalue() == m.SerializeToString()


def test_writer_overrides_replace_data_without_touching_the_model():
    m = build_sample_model()
    before = m.SerializeToString()
    name = m.graph.initializer[0].name
    replacement = np.full((2, 3), 7.0, np.float32)
    overrides = {name: (replacement, onnx.TensorProto.FLOAT)}
    buffer = io.BytesIO()
    write_model(m, buffer, overrides)
    assert m.SerializeToString() == before
    written = onnx.load_from_string(buffer.getvalue())
    np.testing.assert_array_equal(numpy_helper.to_array(written.graph.initializer[0]), replacement)
    assert [t.name for t in written.graph.initializer] == [t.name for t in m.graph.initializer]


def test_reader_equals_protobuf_parse_and_releases_in_order():
    data = _model_with_everything().SerializeToString()
    released: list[int] = []
    parsed = read_model(memoryview(data), released.append)
    assert parsed == onnx.ModelProto.FromString(data)
    assert released == sorted(released) and released[-1] <= len(data)


def test_reader_merges_repeated_graph_fields_like_protobuf():
    """A second occurrence of the graph field merges into the first (protobuf semantics)."""
    m = build_sample_model()
    extra = onnx.ModelProto()
    extra.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "late"))
    data = m.SerializeToString() + extra.SerializeToString()
    assert read_model(memoryview(data)) == onnx.ModelProto.FromString(data)


@pytest.mark.parametrize("data", [b"\x3a\xff\xff", b"\x08", b"\x0b\x00", b"\x3a\x05\x2a\x09"])
def test_reader_rejects_malformed_bytes(data):
    with pytest.raises(WireError):
        read_model(memoryview(data))


def _with_unknown_field(message_bytes: bytes, number: int = 99) -> bytes:
    """Append a varint field unknown to onnx (as a newer ONNX release could write)."""
    from bnfold.onnxio.stream import varint

    return message_bytes + varint(number << 3) + varint(7)


def test_writer_keeps_unknown_fields_of_model_graph_and_tensors():
    m = _model_with_everything()
    tensor = onnx.TensorProto.FromString(_with_unknown_field(m.graph.initializer[0].SerializeToString()))
    m.graph.initializer[0].CopyFrom(tensor)
    graph = onnx.GraphProto.FromString(_with_unknown_field(m.graph.SerializeToString(), 98))
    m.graph.CopyFrom(graph)
    m = onnx.ModelProto.FromString(_with_unknown_field(m.SerializeToString(), 97))
    buffer = io.BytesIO()
    write_model(m, buffer)
    assert buffer.getvalue() == m.SerializeToString()
    assert len(buffer.getvalue()) > len(_model_with_everything().SerializeToString())


def test_writer_reserves_exactly_the_bytes_it_writes(tmp_path, monkeypatch):
    # A reservation larger than the file would leave blocks allocated past its end: the size
    # asked for must be the size written.
    import bnfold.onnxio.stream as stream

    reserved: list[int] = []
    monkeypatch.setattr(stream, "reserve", lambda handle, nbytes: reserved.append(nbytes))
    m = _model_with_everything()
    m.graph.initializer.append(numpy_helper.from_array(np.ones(1 << 16, np.float32), "big"))
    path = tmp_path / "m.onnx"
    with open(path, "wb") as handle:
        write_model(m, handle)
    assert path.read_bytes() == m.SerializeToString()
    assert reserved == [path.stat().st_size]


def test_reserve_allocates_blocks_without_changing_the_length(tmp_path):
    from bnfold.onnxio.preallocate import MIN_BYTES, reserve

    assert not reserve(io.BytesIO(), MIN_BYTES)  # no file behind it
    path = tmp_path / "reserved.bin"
    with open(path, "wb") as handle:
        assert not reserve(handle, MIN_BYTES - 1)  # too small to be worth a call
        if not reserve(handle, MIN_BYTES):
            pytest.skip("this platform or file system cannot reserve blocks (fallocate)")
        handle.write(b"model")
    stat = path.stat()
    assert stat.st_size == 5
    assert stat.st_blocks * 512 >= MIN_BYTES
