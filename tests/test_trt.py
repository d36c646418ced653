"""TensorRT: what can be tested without it (profiles, sizes, inspector JSON, missing library),
and real builds marked `trt`, skipped where tensorrt is not installed."""

import importlib.util

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnfold.deploy.trt_options import (BuildOptions, ShapeProfile, check_in_profile, parse_profile,
                          parse_profiles, parse_size, profiles_for_model)
from bnfold.cli.common import BnfoldGroup
from bnfold.cli.deploy_commands import bench_command, build_command
from bnfold.deploy.engines.trt import layer_precisions
from bnfold.errors import BnfoldError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (pip install bnfold[trt])")


def _cli():
    group = BnfoldGroup(name="bnfold")
    group.add_command(build_command)
    group.add_command(bench_command)
    return group


def _model(dims):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_parse_profile_min_opt_max():
    p = parse_profile("input:1x3x224x224/8x3x224x224/32x3x224x224")
    assert p == ShapeProfile("input", (1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert parse_profile("x:2x4") == ShapeProfile("x", (2, 4), (2, 4), (2, 4))


@pytest.mark.parametrize("text", ["input", "input:1x3/4x3", "input:1x3/2x3/1x3",
                                  "input:1x3/2x3x1/4x3", "input:0x3"])
def test_parse_profile_refuses_bad_text(text):
    with pytest.raises(BnfoldError):
        parse_profile(text)


def test_parse_profiles_refuses_duplicates():
    with pytest.raises(BnfoldError, match="more than once"):
        parse_profiles(["x:1x2", "x:2x2"])


@pytest.mark.parametrize("text,expected", [("1G", 2**30), ("512M", 512 * 2**20), ("2GiB", 2**31),
                                           ("1024", 1024), ("1.5K", 1536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "0", "1X"])
def test_parse_size_refuses(text):
    with pytest.raises(BnfoldError):
        parse_size(text)


def test_profiles_needed_only_for_dynamic_inputs():
    assert profiles_for_model(_model([1, 3, 8, 8]), []) == []
    with pytest.raises(BnfoldError, match=r"e.g. input:1x3x8x8/8x3x8x8/32x3x8x8"):
        profiles_for_model(_model(["N", 3, 8, 8]), [])
    given = [parse_profile("input:1x3x8x8/4x3x8x8/16x3x8x8")]
    assert profiles_for_model(_model(["N", 3, 8, 8]), given) == given


@pytest.mark.parametrize("text,message", [
    ("input:1x3x8/4x3x8/16x3x8", "rank"),
    ("input:1x4x8x8/4x4x8x8/16x4x8x8", "fixed at 3"),
    ("other:1x3x8x8", "does not take"),
])
def test_profiles_checked_against_the_model(text, message):
    with pytest.raises(BnfoldError, match=message):
        profiles_for_model(_model(["N", 3, 8, 8]), [parse_profile(text)])


def test_shape_outside_profile_is_a_clear_error():
    profile = parse_profile("input:1x3x8x8/4x3x8x8/16x3x8x8")
    check_in_profile(profile, (16, 3, 8, 8))
    with pytest.raises(BnfoldError, match="outside the engine's profile"):
        check_in_profile(profile, (32, 3, 8, 8))
    with pytest.raises(BnfoldError, match="outside"):
        check_in_profile(profile, (4, 3, 8))


def test_layer_precisions_reads_both_inspector_schemas():
    # Field layouts as documented: 10.x "Format/Datatype" strings; 11.x separate "DataType".
    v10 = {"Layers": [
        {"Name": "conv1", "Outputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format (kLINEAR)"}]},
        {"Name": "fc", "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP32 format (kLINEAR)"}]},
        "a layer name only (LayerInformation below DETAILED)",
    ], "Bindings": ["input", "y"]}
    v11 = {"Layers": [{"Name": "conv1", "Outputs": [{"Name": "a", "DataType": "Half",
                                                     "Format": "Row major linear (kLINEAR)"}]}],
           "I/O Tensors": []}
    assert layer_precisions(v10) == {"Half": 1, "Float": 1}
    assert layer_precisions(v11) == {"Half": 1}
    assert layer_precisions({}) == {}


def test_build_option_errors_are_usage_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model([1, 3, 8, 8]), path)
    runner = CliRunner()
    result = runner.invoke(_cli(), ["build", str(path), "--shapes", "input:1x3/9"])
    assert result.exit_code == 2 and "--shapes" in result.output
    result = runner.invoke(_cli(), ["build", str(path), "--workspace", "lots"])
    assert result.exit_code == 2 and "--workspace" in result.output
    result = runner.invoke(_cli(), ["build", str(path), "--opt-level", "9"])
    assert result.exit_code == 2


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-library path cannot run")
def test_build_without_tensorrt_says_how_to_install(tmp_path):
    from bnfold.deploy.build import build

    path = tmp_path / "m.onnx"
    onnx.save(_model([1, 3, 8, 8]), path)
    with pytest.raises(BnfoldError, match=r"pip install bnfold\[trt\]"):
        build(str(path), str(tmp_path / "m.engine"), BuildOptions())
    result = CliRunner().invoke(_cli(), ["build", str(path)])
    assert result.exit_code == 1 and "TensorRT is not installed" in result.output
    result = CliRunner().invoke(_cli(), ["bench", str(path), "--engine", "trt"])
    assert result.exit_code == 1 and "TensorRT is not installed" in result.output


@pytest.mark.trt
@needs_trt
def test_build_real_engine_with_dynamic_batch(tmp_path):
    from bnfold.deploy.build import build

    path = tmp_path / "m.onnx"
    onnx.save(_model(["N", 3, 8, 8]), path)
    options = BuildOptions(profiles=[parse_profile("input:1x3x8x8/2x3x8x8/4x3x8x8")],
                           workspace_bytes=2**28, opt_level=1,
                           timing_cache=str(tmp_path / "cache.bin"))
    report = build(str(path), str(tmp_path / "m.engine"), options)
    assert (tmp_path / "m.engine").stat().st_size > 0
    assert report.timing_cache_saved and (tmp_path / "cache.bin").exists()


@pytest.mark.trt
@needs_trt
def test_fp16_build_reports_inspected_precision(tmp_path):
    from bnfold.deploy.build import build

    path = tmp_path / "m.onnx"
    onnx.save(_model([1, 3, 8, 8]), path)
    report = build(str(path), str(tmp_path / "m.engine"), BuildOptions(fp16=True))
    assert report.fp16_method is not None
    assert report.layer_precisions  # read from the engine inspector, not from the request


@pytest.mark.trt
@needs_trt
def test_corrupt_engine_file_is_a_clear_error(tmp_path):
    from bnfold.deploy.engines.trt import load_engine_file

    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine")
    with pytest.raises(BnfoldError, match="rebuild it"):
        load_engine_file(str(bad))
