"""merge-convs: an Add of two Convs of one input becomes one Conv (RepVGG/MobileOne branches)."""

from __future__ import annotations

import numpy as np
import pytest
from golden import assert_same_outputs, count_ops, model, rng, tensor
from onnx import checker, helper

import bnfold


def branches(kernels=((3, 3), (1, 1)), pads=((1, 1, 1, 1), (0, 0, 0, 0)), strides=(1, 1),
             dilations=((1, 1), (1, 1)), group=1, biases=(True, False), reader=False,
             channels=4, size=8):
    """Add(conv_a(x), conv_b(x)), after each of whose BNs folded; `reader` also reads conv_b."""
    r = rng(40)
    spatial = len(kernels[0])
    nodes, inits = [], []
    for name, kernel, pad, dilation, bias in zip("ab", kernels, pads, dilations, biases):
        inits.append(tensor(f"W{name}", r.standard_normal((channels, channels // group,
                                                            *kernel))))
        inputs = ["x", f"W{name}"]
        if bias:
            inits.append(tensor(f"b{name}", r.standard_normal(channels)))
            inputs.append(f"b{name}")
        nodes.append(helper.make_node("Conv", inputs, [f"c{name}"], name=f"conv_{name}",
                                      pads=list(pad), strides=[strides[0]] * spatial,
                                      dilations=list(dilation), group=group))
    nodes.append(helper.make_node("Add", ["ca", "cb"], ["y"], name="sum"))
    outputs = [("y", None)]
    if reader:
        nodes.append(helper.make_node("Relu", ["cb"], ["side"]))
        outputs.append(("side", None))
    return model(nodes, [("x", [1, channels, *[size] * spatial])], outputs, inits, opset=17)


def feed_for(m):
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return {"x": rng(41).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("case", [
    {},  # RepVGG: 3×3 pad 1 + 1×1
    {"strides": (2, 2)},  # a downsampling block
    {"group": 4},  # depthwise (MobileOne, RepViT)
    {"kernels": ((7, 7), (3, 3)), "pads": ((3, 3, 3, 3), (1, 1, 1, 1))},  # FastViT large+small
    {"kernels": ((1, 1), (3, 3)), "pads": ((0, 0, 0, 0), (1, 1, 1, 1))},  # the 1×1 comes first
    {"kernels": ((3,), (1,)), "pads": ((2, 2), (0, 0)), "dilations": ((2,), (1,))},  # 1-D
    {"kernels": ((3, 3), (1, 1)), "pads": ((2, 2, 2, 2), (0, 0, 0, 0)),
     "dilations": ((2, 2), (1, 1))},  # dilated, the 1×1 at the centre tap
    {"biases": (False, False)},
    {"kernels": ((3, 3, 3), (1, 1, 1)), "pads": ((1,) * 6, (0,) * 6),
     "dilations": ((1,) * 3, (1,) * 3)},  # 3-D
])
def test_two_convs_of_one_input_summed_become_one(case):
    m = branches(**case)
    checker.check_model(m)
    result = bnfold.fold(m)
    checker.check_model(result.model)
    (entry,) = result.report.folded
    assert entry.rule == "merge-convs" and entry.op_type == "Add"
    assert result.report.to_dict()["summary"]["convs_merged"] == 1
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    merged = result.model.graph.node[0]
    assert merged.output[0] == "y" and (len(merged.input) == 3) == any(
        case.get("biases", (True,)))
    assert_same_outputs(m, result.model, feed_for(m), 1e-5)


@pytest.mark.parametrize("case", [
    {"reader": True},  # conv_b's output is read elsewhere too
    # ACNet's 1×3 + 3×1: neither window holds the other
    {"kernels": ((1, 3), (3, 1)), "pads": ((0, 1, 0, 1), (1, 0, 1, 0))},
    # same output size, but the taps are 2 apart in one and 1 apart in the other
    {"kernels": ((3, 3), (3, 3)), "pads": ((2, 2, 2, 2), (1, 1, 1, 1)),
     "dilations": ((2, 2), (1, 1))},
    # the 1×1 reads the position between two of the dilated kernel's taps
    {"kernels": ((3, 3), (1, 1)), "pads": ((3, 3, 1, 1), (0, 0, 0, 0)),
     "dilations": ((2, 2), (1, 1))},
])
def test_convs_that_cannot_merge_stay_as_they_were(case):
    m = branches(**case)
    checker.check_model(m)
    result = bnfold.fold(m)
    assert result.report.folded == []
    assert count_ops(result.model, "Conv") == 2 and count_ops(result.model, "Add") == 1


def test_acnet_block_summed_in_its_own_order_becomes_one_3x3():
    # ACNet's ACBlock returns square + vertical + horizontal: (3×3 + 3×1) merges first, then
    # the 1×3 lies inside the merged 3×3.
    r = rng(42)
    nodes, inits = [], []
    for name, kernel, pads in (("sq", (3, 3), (1, 1, 1, 1)), ("ver", (3, 1), (1, 0, 1, 0)),
                               ("hor", (1, 3), (0, 1, 0, 1))):
        inits.append(tensor(f"W{name}", r.standard_normal((4, 4, *kernel))))
        nodes.append(helper.make_node("Conv", ["x", f"W{name}"], [name], name=f"conv_{name}",
                                      pads=list(pads), kernel_shape=list(kernel)))
    nodes += [helper.make_node("Add", ["sq", "ver"], ["s1"]),
              helper.make_node("Add", ["s1", "hor"], ["y"])]
    m = model(nodes, [("x", [1, 4, 8, 8])], [("y", None)], inits, opset=17)
    result = bnfold.fold(m)
    checker.check_model(result.model)
    assert result.report.to_dict()["summary"]["convs_merged"] == 2
    (conv,) = result.model.graph.node
    assert conv.op_type == "Conv" and conv.output[0] == "y"
    assert_same_outputs(m, result.model, feed_for(m), 1e-5)
