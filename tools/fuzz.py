"""Fuzz `bnfold fold`: seeded, bounded mutations of small Conv/ConvTranspose/Gemm/If + BN models.

Each case is one mutated model (structure-aware: attributes, dims, dtypes, node and input lists,
opset/IR versions, If/Loop bodies, external data, extreme weights; or byte-level: flips,
truncations, splices). `python -m bnfold fold IN -o OUT` runs in a subprocess under an
address-space cap (RLIMIT_AS) and a timeout, and the outcome is classified:

    clean error        exit 1/2, exactly one stderr line, no traceback
    clean success      exit 0, output passes onnx.checker and matches the input on 3 input sets
                       in ONNX Runtime with graph optimisation off (checked in a subprocess too)
    success, unchecked exit 0 and a valid output, but ORT cannot run the input (nothing to compare)
    traceback / invalid output / stray stderr / not equivalent / NOT-equivalent-where-unchanged /
    hang / input modified / leftover staging / crash (signal, memory)

    python tools/fuzz.py --cases 300 --seed 0 --jobs 2 [--keep DIR]

Failing cases are kept under --keep (default fuzz-out/) as case-N/ with the command to rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MEMORY_CAP = 6 * 2**30
TIMEOUT_S = 60
GOOD = ("clean error", "clean success", "success, unchecked")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- seeds ---------------------------------------------------------------------------------


def _t(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _bn(prefix, x, y, c, r, **attrs):
    inits = [_t(f"{prefix}_s", r.uniform(0.5, 1.5, c)), _t(f"{prefix}_b", r.normal(0, 0.1, c)),
             _t(f"{prefix}_m", r.normal(0, 0.1, c)), _t(f"{prefix}_v", r.uniform(0.5, 2, c))]
    node = helper.make_node("BatchNormalization", [x] + [t.name for t in inits], [y],
                            name=prefix, **attrs)
    return node, inits


def _model(nodes, inputs, outputs, inits, opset=17):
    # Outputs of unknown shape but known rank: the checker wants a shape on main-graph outputs.
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{n}{i}" for i in range(rank)])
         for n, rank in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def seed_models(r: np.random.Generator) -> dict[str, onnx.ModelProto]:
    seeds = {}
    bn, p = _bn("bn", "c", "y", 4, r)
    seeds["conv_bn"] = _model(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn],
        [("x", ["N", 3, 5, 5])], [("y", 4)],
        [_t("W", r.normal(0, 0.3, (4, 3, 3, 3))), _t("B", r.normal(0, 0.1, 4)), *p])
    bn, p = _bn("bn", "c", "y", 4, r)
    seeds["convtranspose_bn"] = _model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["c"], name="deconv", group=2), bn],
        [("x", [1, 4, 3, 3])], [("y", 4)], [_t("W", r.normal(0, 0.3, (4, 2, 2, 2))), *p])
    bn, p = _bn("bn", "g", "y", 5, r)
    seeds["gemm_bn"] = _model(
        [helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm", transB=1, beta=0.5), bn],
        [("x", [2, 3])], [("y", 2)], [_t("B", r.normal(0, 0.5, (5, 3))), _t("C", r.normal(0, 1, 5)), *p])
    bn, p = _bn("bn", "x", "b", 3, r)
    seeds["bn_gemm"] = _model(
        [bn, helper.make_node("Gemm", ["b", "B"], ["y"], name="gemm", alpha=2.0)],
        [("x", [2, 3])], [("y", 2)], [_t("B", r.normal(0, 0.5, (3, 4))), *p])
    bn, p = _bn("bn", "x", "b", 3, r)
    seeds["bn_conv"] = _model(
        [bn, helper.make_node("Conv", ["b", "W"], ["y"], name="conv", group=1)],
        [("x", [1, 3, 4, 4])], [("y", 4)], [_t("W", r.normal(0, 0.3, (2, 3, 1, 1))), *p])
    bn, p = _bn("bn", "m", "y", 4, r)
    seeds["matmul_bn"] = _model(
        [helper.make_node("MatMul", ["x", "B"], ["m"], name="mm"), bn],
        [("x", [2, 3])], [("y", 2)], [_t("B", r.normal(0, 0.5, (3, 4))), *p])
    # paddle2onnx's BatchNorm1D → Linear → BatchNorm1D: BN → MatMul → Add → Identity → BN
    # (bn-matmul, then matmul-bn through the Identity).
    bn_in, p_in = _bn("bn_in", "x", "n", 3, r)
    bn_out, p_out = _bn("bn_out", "a_id", "y", 4, r)
    seeds["bn_linear_bn"] = _model(
        [bn_in, helper.make_node("MatMul", ["n", "B"], ["m"], name="linear"),
         helper.make_node("Add", ["m", "C"], ["a"], name="linear_bias"),
         helper.make_node("Identity", ["a"], ["a_id"], name="id"), bn_out],
        [("x", ["N", 3])], [("y", 2)],
        [_t("B", r.normal(0, 0.5, (3, 4))), _t("C", r.normal(0, 1, 4)), *p_in, *p_out])
    # If whose then-branch holds Conv→BN reading outer weights.
    bn, p = _bn("ibn", "ic", "iy", 2, r)
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "IW"], ["ic"], name="iconv"), bn], "then", [],
        [helper.make_tensor_value_info("iy", TensorProto.FLOAT, None)], p)
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "IW"], ["ey"], name="econv")], "else", [],
        [helper.make_tensor_value_info("ey", TensorProto.FLOAT, None)])
    seeds["if_bn"] = _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [("x", [1, 2, 3, 3])], [("y", 4)], [_t("IW", r.normal(0, 0.3, (2, 2, 1, 1))),
                                         _t("cond", True, np.bool_)])
    # A model-local function holding Conv→BN, its weights passed in (export_modules_as_functions).
    bn, p = _bn("bn", "c", "y", 4, r)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    block = helper.make_function(
        "local", "Block", ["x", "W", *bn.input[1:]], ["y"],
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), bn], opsets)
    seeds["function_bn"] = _model(
        [helper.make_node("Block", ["x", "W", *bn.input[1:]], ["y"], domain="local", name="call")],
        [("x", [1, 3, 4, 4])], [("y", 4)], [_t("W", r.normal(0, 0.3, (4, 3, 3, 3))), *p])
    # RepVGG/MobileOne before reparameterisation: Conv→BN branches + BN(x) through a zero Add
    # (identity-bn, then merge-convs).
    bn3, p3 = _bn("bn3", "c3", "n3", 4, r)
    bn1, p1 = _bn("bn1", "c1", "n1", 4, r)
    bnid, pid = _bn("bnid", "x", "nid", 4, r)
    seeds["rep_block"] = _model(
        [helper.make_node("Conv", ["x", "W3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]), bn3,
         helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"), bn1, bnid,
         helper.make_node("Add", ["nid", "zero"], ["nid0"], name="zero_add"),
         helper.make_node("Add", ["n3", "n1"], ["s"], name="add"),
         helper.make_node("Add", ["s", "nid0"], ["y"], name="add_id")],
        [("x", [1, 4, 5, 5])], [("y", 4)],
        [_t("W3", r.normal(0, 0.3, (4, 4, 3, 3))), _t("W1", r.normal(0, 0.3, (4, 4, 1, 1))),
         _t("zero", 0.0), *p3, *p1, *pid])
    # RepViT's BN(conv3(x) + conv1(x) + x), depthwise, then FastViT's x − BN(x) (add-bn over a
    # tree with an identity leaf; identity-bn through a Sub).
    bn, p = _bn("bn", "s2", "n", 4, r)
    bnsub, psub = _bn("bnsub", "x", "nsub", 4, r)
    seeds["rep_sum"] = _model(
        [helper.make_node("Conv", ["x", "W3", "B3"], ["c3"], name="conv3", pads=[1, 1, 1, 1],
                          group=4),
         helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", group=4),
         helper.make_node("Add", ["c3", "c1"], ["s1"], name="add1"),
         helper.make_node("Add", ["s1", "x"], ["s2"], name="add2"), bn,
         helper.make_node("Conv", ["x", "Wm"], ["cm"], name="mixer", pads=[1, 1, 1, 1], group=4),
         bnsub, helper.make_node("Sub", ["cm", "nsub"], ["d"], name="sub"),
         helper.make_node("Add", ["n", "d"], ["y"], name="out")],
        [("x", [1, 4, 5, 5])], [("y", 4)],
        [_t("W3", r.normal(0, 0.3, (4, 1, 3, 3))), _t("B3", r.normal(0, 0.1, 4)),
         _t("W1", r.normal(0, 0.3, (4, 1, 1, 1))), _t("Wm", r.normal(0, 0.3, (4, 1, 3, 3))),
         *p, *psub])
    seeds["function_bn"].functions.append(block)
    del seeds["function_bn"].opset_import[:]
    seeds["function_bn"].opset_import.extend(opsets)
    return seeds


# ---- mutations -----------------------------------------------------------------------------


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _nodes(model):
    return [(g, n) for g in _graphs(model.graph) for n in g.node]


ATTR_NAMES = ("group", "epsilon", "pads", "alpha", "beta", "transA", "transB", "training_mode",
              "auto_pad", "spatial", "is_test", "strides", "dilations", "momentum")
ATTR_VALUES = (0, -1, 1, 2, 3, 2**40, 1.5, float("nan"), float("inf"), -1e-5, "2", "SAME_UPPER",
               b"\xff", [1, 2], [0, 0, 0, 0], [1.0], [])


def mutate_attribute(rnd, model):
    graph, node = rnd.choice(_nodes(model))
    name = rnd.choice(ATTR_NAMES + tuple(a.name for a in node.attribute))
    value = rnd.choice(ATTR_VALUES)
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    if rnd.random() < 0.15:
        node.attribute.append(onnx.AttributeProto(name=name))  # UNDEFINED
    elif value == [] or rnd.random() < 0.1:
        pass  # removed
    else:
        node.attribute.append(helper.make_attribute(name, value))


def _initializers(model):
    return [t for g in _graphs(model.graph) for t in g.initializer]


def mutate_dims(rnd, model):
    inits = _initializers(model)
    if not inits:
        return
    t = rnd.choice(inits)
    dims = list(t.dims)
    choice = rnd.random()
    if choice < 0.3 and dims:
        dims.pop(rnd.randrange(len(dims)))
    elif choice < 0.5:
        dims.insert(rnd.randrange(len(dims) + 1), rnd.choice((1, 2, 0)))
    elif dims:
        dims[rnd.randrange(len(dims))] = rnd.choice((0, 1, 2, 3, 7, 2**31))
    keep_data = rnd.random() < 0.5
    if not keep_data and all(0 <= d < 64 for d in dims):
        arr = numpy_helper.to_array(t)
        new = np.resize(arr, dims) if arr.size else np.zeros(dims, arr.dtype)
        t.CopyFrom(numpy_helper.from_array(new, t.name))
    else:
        del t.dims[:]
        t.dims.extend(dims)


def mutate_dtype(rnd, model):
    inits = _initializers(model)
    if inits:
        t = rnd.choice(inits)
        t.data_type = rnd.choice((0, 1, 2, 6, 7, 8, 9, 10, 11, 16, 17, 22, 99))


def mutate_values(rnd, model):
    inits = [t for t in _initializers(model) if t.data_type == TensorProto.FLOAT]
    if not inits:
        return
    t = rnd.choice(inits)
    arr = numpy_helper.to_array(t).copy()
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    flat[rnd.randrange(flat.size)] = rnd.choice(
        (3e38, -3.4e38, 1e37, 1e-45, 0.0, -1.0, float("nan"), float("inf"), 1e20))
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def mutate_node_list(rnd, model):
    graph = rnd.choice(list(_graphs(model.graph)))
    nodes = list(graph.node)
    if not nodes:
        return
    choice = rnd.random()
    if choice < 0.3:
        nodes.pop(rnd.randrange(len(nodes)))
    elif choice < 0.55:
        nodes.insert(rnd.randrange(len(nodes) + 1), rnd.choice(nodes))
    elif choice < 0.8:
        rnd.shuffle(nodes)
    else:
        node = rnd.choice(nodes)
        node.op_type = rnd.choice(("Conv", "Gemm", "BatchNormalization", "Identity", "Relu",
                                   "Constant", "Mul", "Add", "Dropout", "Cast", "Bogus"))
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def mutate_io_lists(rnd, model):
    graph, node = rnd.choice(_nodes(model))
    names = [n for g in _graphs(model.graph) for n in
             [t.name for t in g.initializer] + [v.name for v in g.input] + [o for x in g.node
                                                                           for o in x.output]]
    field = node.input if rnd.random() < 0.7 else node.output
    choice = rnd.random()
    if choice < 0.3 and len(field):
        del field[rnd.randrange(len(field))]
    elif choice < 0.6:
        field.append(rnd.choice(names + ["", "nowhere"]))
    elif len(field):
        field[rnd.randrange(len(field))] = rnd.choice(names + [""])
    if rnd.random() < 0.2:
        outs = model.graph.output
        if len(outs) and rnd.random() < 0.5:
            outs[0].type.tensor_type.elem_type = rnd.choice((0, 1, 7, 10, 11))
        else:
            outs.add().CopyFrom(helper.make_tensor_value_info(rnd.choice(names), 1, None))


def mutate_versions(rnd, model):
    if rnd.random() < 0.5:
        model.ir_version = rnd.choice((-1, 1, 2, 3, 4, 7, 10, 11, 99))
    else:
        model.opset_import[0].version = rnd.choice((1, 5, 6, 7, 9, 11, 14, 15, 21, 24, 99))
        if rnd.random() < 0.3:
            model.opset_import.add().CopyFrom(helper.make_opsetid("", 13))


def mutate_subgraph(rnd, model):
    ifs = [(g, n) for g, n in _nodes(model) if n.attribute and n.op_type in ("If", "Loop")]
    if not ifs:
        # Wrap the main graph in an If/Loop body reading outer-scope tensors.
        body = helper.make_graph(list(model.graph.node), "body", [], list(model.graph.output),
                                 list(model.graph.initializer) if rnd.random() < 0.5 else [])
        if not len(body.initializer):
            pass
        else:
            del model.graph.initializer[:]
        cond = _t("fz_cond", rnd.random() < 0.5, np.bool_)
        node = helper.make_node("If", ["fz_cond"], [o.name for o in model.graph.output],
                                then_branch=body, else_branch=body)
        del model.graph.node[:]
        model.graph.node.append(node)
        model.graph.initializer.append(cond)
        return
    _, node = rnd.choice(ifs)
    attrs = list(node.attribute)
    if rnd.random() < 0.5 and len(attrs) == 2:  # swap the branches
        first = onnx.GraphProto()
        first.CopyFrom(attrs[0].g)
        attrs[0].g.CopyFrom(attrs[1].g)
        attrs[1].g.CopyFrom(first)
    else:
        node.op_type = "Loop"


def mutate_external(rnd, model):
    """Move one initializer into external data `w.bin`, with honest or lying fields."""
    inits = [t for t in model.graph.initializer if t.HasField("raw_data")] or list(
        model.graph.initializer)
    if not inits:
        return
    t = rnd.choice(inits)
    raw = numpy_helper.to_array(t).tobytes() if t.data_type in (1, 7, 9, 11) else t.raw_data
    offset = 4096 * rnd.randrange(0, 2)
    length = rnd.choice((len(raw), len(raw), 20 * 2**30, len(raw) + 4, 0, -5, "abc"))
    location = rnd.choice(("w.bin", "w.bin", "w.bin", "../w.bin", "/etc/passwd", "missing.bin"))
    t.ClearField("raw_data")
    for field in ("float_data", "int64_data", "int32_data", "double_data"):
        t.ClearField(field)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    model.metadata_props.add(key="fuzz_external", value=json.dumps([offset, raw.hex()]))


STRUCTURE = (mutate_attribute, mutate_dims, mutate_dtype, mutate_values, mutate_node_list,
             mutate_io_lists, mutate_versions, mutate_subgraph, mutate_external)


def byte_mutation(rnd, data: bytes, other: bytes) -> bytes:
    data = bytearray(data)
    choice = rnd.random()
    if choice < 0.5:
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
    elif choice < 0.75:
        data = data[: rnd.randrange(1, len(data))]
    else:
        cut = rnd.randrange(len(data))
        data = data[:cut] + other[rnd.randrange(len(other)):]
    return bytes(data)


def make_case(case: int, seed: int, seeds: dict, folder: str) -> str:
    """Write case `case`'s model into `folder`; returns what was done to it."""
    rnd = random.Random(seed * 1_000_003 + case)
    name = rnd.choice(sorted(seeds))
    model = onnx.ModelProto()
    model.CopyFrom(seeds[name])
    data_file = None
    if rnd.random() < 0.2:
        other = seeds[rnd.choice(sorted(seeds))].SerializeToString()
        data = byte_mutation(rnd, model.SerializeToString(), other)
        done = f"{name} + bytes"
    else:
        steps = [rnd.choice(STRUCTURE) for _ in range(rnd.randint(1, 3))]
        for step in steps:
            try:
                step(rnd, model)
            except Exception:  # noqa: BLE001 - onnx's own helpers raise ValidationError too
                pass  # a mutation that does not apply to this model: the others still do
        done = f"{name} + " + ", ".join(s.__name__.replace("mutate_", "") for s in steps)
        for prop in list(model.metadata_props):
            if prop.key == "fuzz_external":
                offset, payload = json.loads(prop.value)
                data_file = bytes(offset) + bytes.fromhex(payload)
        for index in reversed(range(len(model.metadata_props))):
            if model.metadata_props[index].key == "fuzz_external":
                del model.metadata_props[index]
        data = model.SerializeToString()
    with open(os.path.join(folder, "in.onnx"), "wb") as handle:
        handle.write(data)
    if data_file is not None:
        with open(os.path.join(folder, "w.bin"), "wb") as handle:
            handle.write(data_file)
            if rnd.random() < 0.5:
                handle.truncate(21 * 2**30)  # sparse: a lying length finds bytes to read
    return done


# ---- running and classifying ---------------------------------------------------------------


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _digest(folder: str) -> dict[str, str]:
    """A hash per file; a sparse multi-GiB data file is hashed by its stat and its first MiB."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            info = os.stat(path)
            hasher = hashlib.sha256(f"{info.st_size} {info.st_mtime_ns}".encode())
            with open(path, "rb") as handle:
                hasher.update(handle.read(2**26 if info.st_size <= 2**26 else 2**20))
            out[name] = hasher.hexdigest()
    return out


def _python(args, timeout, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="default", NO_COLOR="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit_memory, env=env, errors="replace")


def run_case(case: int, seed: int, seeds: dict, keep: str) -> tuple[str, str, str]:
    folder = tempfile.mkdtemp(prefix=f"fuzz-{case}-")
    out_dir = os.path.join(folder, "out")
    os.mkdir(out_dir)
    try:
        done = make_case(case, seed, seeds, folder)
        before = _digest(folder)
        command = ["-m", "bnfold", "fold", "in.onnx", "-o", "out/out.onnx", "--report",
                   "out/report.json"]
        start = time.monotonic()
        try:
            proc = _python(command, TIMEOUT_S, folder)
        except subprocess.TimeoutExpired:
            verdict, detail = "hang", f"> {TIMEOUT_S} s"
        else:
            verdict, detail = classify(proc, folder, out_dir)
        if verdict != "hang" and _digest(folder) != before:
            verdict, detail = "input modified", str(sorted(_digest(folder)))
        staging = [n for d in (folder, out_dir) for n in os.listdir(d) if n.startswith(".bnfold-")]
        if staging and verdict in GOOD:
            verdict, detail = "leftover staging", str(staging)
        detail = f"{detail} [{time.monotonic() - start:.1f} s]"
        if verdict not in GOOD:
            target = os.path.join(keep, f"case-{case}")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target, ignore=lambda d, names: [
                n for n in names if n == "w.bin" and os.path.getsize(os.path.join(d, n)) > 2**24])
            with open(os.path.join(target, "README"), "w") as handle:
                handle.write(f"{done}\n{verdict}: {detail}\ncd {target} && "
                             f"PYTHONPATH={ROOT} python -m bnfold fold in.onnx -o out/out.onnx\n")
        return verdict, done, detail
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def classify(proc, folder: str, out_dir: str) -> tuple[str, str]:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1][:200] if lines else ""
    if "Traceback (most recent call last)" in proc.stderr:
        return "traceback", last
    if proc.returncode < 0 or proc.returncode > 2:
        return "crash", f"exit {proc.returncode}: {last}"
    if proc.returncode in (1, 2):
        if len(lines) != 1:
            return "stray stderr", " | ".join(lines)[:300]
        if "verification failed" in proc.stdout:
            report = _read_json(os.path.join(out_dir, "report.json"))
            if report and not report.get("summary", {}).get("folded"):
                return "NOT-equivalent-where-unchanged", proc.stdout[-200:]
        return "clean error", last
    if lines:
        return "stray stderr", " | ".join(lines)[:300]
    try:
        check = _python([os.path.abspath(__file__), "--check", folder], TIMEOUT_S, folder)
    except subprocess.TimeoutExpired:
        return "hang", "equivalence check timed out"
    verdict = check.stdout.strip().splitlines()[-1] if check.stdout.strip() else ""
    if check.returncode != 0 or not verdict:
        return "check crashed", check.stderr.strip().splitlines()[-1:] and \
            check.stderr.strip().splitlines()[-1][:200]
    kind, _, text = verdict.partition(": ")
    return kind, text


def _read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# ---- the equivalence check (run in its own capped subprocess) -----------------------------


def _feeds(session, count: int):
    r = np.random.default_rng(0)
    for _ in range(count):
        feed = {}
        for arg in session.get_inputs():
            shape = [d if isinstance(d, int) and d >= 0 else 2 for d in arg.shape]
            kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else "float"
            dtype = {"float": np.float32, "double": np.float64, "float16": np.float16,
                     "bool": np.bool_, "int64": np.int64, "int32": np.int32}.get(kind)
            if dtype is None:
                return
            if dtype is np.bool_:
                feed[arg.name] = r.random(shape) < 0.5
            else:
                feed[arg.name] = r.standard_normal(shape).astype(dtype)
        yield feed


def check_case(folder: str) -> str:
    """One line `<verdict>: <detail>` for an exit-0 case."""
    import onnxruntime as ort

    out = os.path.join(folder, "out", "out.onnx")
    try:
        onnx.checker.check_model(out)
    except Exception as exc:  # noqa: BLE001 (any checker failure is the finding)
        return f"invalid output: {str(exc).splitlines()[0][:200]}"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        reference = ort.InferenceSession(os.path.join(folder, "in.onnx"), options)
    except Exception:  # noqa: BLE001
        return "success, unchecked: ORT cannot load the input"
    try:
        candidate = ort.InferenceSession(out, options)
    except Exception as exc:  # noqa: BLE001
        return f"invalid output: ORT cannot load it: {str(exc).splitlines()[0][:150]}"
    compared = 0
    for feed in _feeds(reference, 3):
        try:
            want = reference.run(None, feed)
        except Exception:  # noqa: BLE001
            continue
        try:
            got = candidate.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            return f"not equivalent: output fails to run: {str(exc).splitlines()[0][:150]}"
        for a, b in zip(want, got):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                return f"not equivalent: shape {a.shape} vs {b.shape}"
            if a.dtype.kind in "fc":
                same_special = np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(
                    a[np.isinf(a)], b[np.isinf(a)]) and np.array_equal(np.isinf(a), np.isinf(b))
                finite = np.isfinite(a)
                scale = float(np.abs(a[finite]).max(initial=1.0))
                close = np.allclose(a[finite], b[finite], rtol=0, atol=1e-4 * scale)
                if not (same_special and close):
                    return "not equivalent: outputs differ"
            elif not np.array_equal(a, b):
                return "not equivalent: outputs differ"
        compared += 1
    if not compared:
        return "success, unchecked: ORT cannot run the input"
    return f"clean success: {compared} input sets"


# ---- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", default="fuzz-out", help="where failing cases are kept")
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        print(check_case(args.check))
        return 0
    seeds = seed_models(np.random.default_rng(0))
    os.makedirs(args.keep, exist_ok=True)
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: run_case(c, args.seed, seeds, args.keep),
                                range(args.cases)))
    counts = Counter(verdict for verdict, _, _ in results)
    print(f"\n{args.cases} cases, seed {args.seed}, {args.jobs} jobs, "
          f"{time.monotonic() - start:.0f} s")
    print(f"{'outcome':34} {'cases':>6}")
    for verdict in (*GOOD, "traceback", "invalid output", "stray stderr", "not equivalent",
                    "NOT-equivalent-where-unchanged", "hang", "crash", "check crashed",
                    "input modified", "leftover staging"):
        print(f"{verdict:34} {counts.get(verdict, 0):6}")
    bad = [(c, r) for c, r in enumerate(results) if r[0] not in GOOD]
    for case, (verdict, done, detail) in bad[:40]:
        print(f"  case-{case}: {verdict}: {done}: {detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
