"""The least any Python fold of a Conv->BN chain can cost: a lower bound for issue #12 (a).

Not a product and not bnfold: it folds every BatchNormalization that directly follows a Conv
whose output nothing else reads, assuming what bench_scale's chains guarantee (float32
raw_data parameters, one channel count, a Conv bias-free, epsilon an attribute or its default)
and checking nothing else: no attribute, type, shape or finiteness check, no report, no
onnx.checker, no atomic write. What is left is what every pure-Python fold must do anyway:
import onnx, parse, read each node's op type, inputs and outputs once, index the initializers
by name, write the new values, drop the BatchNormalization nodes and their parameters, and
serialise. tools/bench_speed.py runs it beside the I/O floor and fold_file on its chains.

    python tools/bare_fold.py chain.onnx out.onnx     # prints its phases on stderr
"""

from __future__ import annotations

import sys
import time


def main(source: str, target: str) -> None:
    start = time.perf_counter()
    import numpy as np
    import onnx

    marks = [("imports", time.perf_counter())]
    model = onnx.load(source)
    marks.append(("parse", time.perf_counter()))
    graph = model.graph
    nodes = list(graph.node)
    ops = [node.op_type for node in nodes]
    inputs = [tuple(node.input) for node in nodes]
    outputs = [tuple(node.output) for node in nodes]
    producer = {name: i for i, names in enumerate(outputs) for name in names}
    uses: dict[str, int] = {}
    for names in inputs:
        for name in names:
            uses[name] = uses.get(name, 0) + 1
    for value in graph.output:
        uses[value.name] = uses.get(value.name, 0) + 1
    pairs = [(i, producer[inputs[i][0]]) for i, op in enumerate(ops)
             if op == "BatchNormalization" and inputs[i][0] in producer
             and ops[producer[inputs[i][0]]] == "Conv" and uses[inputs[i][0]] == 1]
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    marks.append(("index", time.perf_counter()))
    epsilon = np.array([next((a.f for a in nodes[i].attribute if a.name == "epsilon"), 1e-5)
                        for i, _ in pairs], np.float32).astype(np.float64)
    parameters = b"".join(tensors[name].raw_data for i, _ in pairs for name in inputs[i][1:5])
    weights = b"".join(tensors[inputs[conv][1]].raw_data for _, conv in pairs)
    channels = tensors[inputs[pairs[0][1]][1]].dims[0]
    gamma, beta, mean, var = np.frombuffer(parameters, np.float32).reshape(
        len(pairs), 4, channels).astype(np.float64).transpose(1, 0, 2)
    scale = gamma / np.sqrt(var + epsilon[:, None])
    folded = np.multiply(np.frombuffer(weights, np.float32).reshape(len(pairs), channels, -1),
                         scale[:, :, None], dtype=np.float64).astype(np.float32)
    bias = (beta - mean * scale).astype(np.float32)
    marks.append(("gather+math", time.perf_counter()))
    for k, (bn, conv) in enumerate(pairs):
        tensors[inputs[conv][1]].raw_data = folded[k].tobytes()
        tensors[inputs[bn][2]].raw_data = bias[k].tobytes()  # the BN's B becomes the bias
        nodes[conv].input.append(inputs[bn][2])
        nodes[conv].output[0] = outputs[bn][0]
    dropped_nodes = {bn for bn, _ in pairs}
    dropped_tensors = {name for bn, _ in pairs for name in (inputs[bn][1], *inputs[bn][3:5])}
    kept_nodes = [node for i, node in enumerate(nodes) if i not in dropped_nodes]
    kept_tensors = [t for t in graph.initializer if t.name not in dropped_tensors]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_tensors)
    marks.append(("rewrite", time.perf_counter()))
    onnx.save(model, target)
    marks.append(("save", time.perf_counter()))
    phases, last = [], start
    for name, moment in marks:
        phases.append(f"{name} {moment - last:.3f}")
        last = moment
    print(f"bare fold of {len(pairs)} pairs: {', '.join(phases)}, total {last - start:.3f} s",
          file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/bare_fold.py CHAIN.onnx OUT.onnx")
    main(sys.argv[1], sys.argv[2])
