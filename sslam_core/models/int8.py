"""int8 ONNX graphs that keep a model's decisions.

Every MatMul with a weight matrix becomes an integer product with
- one int8 scale per output channel of the weights (symmetric, [-127, 127]), and
- one scale per token of the activations (symmetric, computed in the graph from the token's own
  largest magnitude), so a token's result does not depend on the other tokens or clips in the batch.
The output block's MatMuls (the last block the graph runs) stay fp32, unless it is the only one, as do
the attention products and the classifier head.

Measured on the fidelity table of docs/guides/cpu-deployment.md: ONNX Runtime's dynamic quantisation
(one activation scale per batch) moved 1.3-7.5 % of the three linear probes' decisions; per-token
scales alone 1-7 %; per-token scales with the output block in fp32 at most 1 % (1.5 % on the polydigits
fine-tune), at 1.1-1.3x the dynamic graph's time.

Only standard ONNX operators are used (QuantizeLinear, MatMulInteger), so an `--int8` export runs in
any ONNX runtime; ONNX Runtime runs them on its u8 x s8 integer kernels.
"""

from __future__ import annotations

import re

import numpy as np

SCHEME = 3  # of the cached int8 models: 3 = per-token activation scales and the output block in fp32
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's record of each node's module path
_BLOCK = re.compile(r"\bblocks\.(\d+)\b")


class QuantizationError(ValueError):
    """The graph does not have the structure the quantiser needs."""


def block_index(node: object) -> int | None:
    """The encoder block a node was exported from (0-based), from its module path; None outside blocks."""
    for prop in getattr(node, "metadata_props", ()):
        if prop.key == _NAME_SCOPES:
            found = _BLOCK.findall(prop.value)
            return int(found[-1]) if found else None
    return None


def is_weight_matmul(node: object, inits: dict[str, object]) -> bool:
    """Whether `node` is a MatMul whose second input is a 2-D float weight matrix stored in the graph."""
    if node.op_type != "MatMul" or node.input[1] not in inits:
        return False
    w = inits[node.input[1]]
    return len(w.dims) == 2 and w.data_type == 1  # FLOAT


def weight_matmuls(graph: object) -> list[object]:
    """The MatMul nodes of `graph` with a weight matrix (`is_weight_matmul`)."""
    inits = {i.name: i for i in graph.initializer}
    return [n for n in graph.node if is_weight_matmul(n, inits)]


def output_block(graph: object) -> int | None:
    """The last encoder block in the graph, whose MatMuls stay fp32; None when it is the graph's only
    block (an export of block 1), which is then quantised like the others (else nothing would be)."""
    blocks = {b for b in map(block_index, weight_matmuls(graph)) if b is not None}
    if not blocks:
        raise QuantizationError("the exported graph names no encoder blocks (no module paths recorded)")
    return max(blocks) if len(blocks) > 1 else None


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float weights -> (int8 weights, one float32 scale per output column)."""
    scale = np.abs(w).max(axis=0).astype(np.float32) / np.float32(127)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_int8(proto: object) -> object:
    """Rewrite an fp32 ModelProto in place (and return it): per-token int8 MatMuls as described above."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    keep_fp32 = output_block(graph)
    inits = {i.name: i for i in graph.initializer}
    consts = {
        "q8_last_axis": np.array([1], np.int64),
        "q8_lead_from": np.array([0], np.int64),
        "q8_lead_to": np.array([-1], np.int64),
        "q8_inv127": np.array(1 / 127, np.float32),
        "q8_tiny": np.array(np.finfo(np.float32).tiny, np.float32),
        "q8_zero_point": np.array(128, np.uint8),
    }
    nodes, new_inits, replaced = [], [], set()
    for i, node in enumerate(graph.node):
        if not is_weight_matmul(node, inits) or block_index(node) == keep_fp32:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        wq, w_scale = quantize_weights(w)
        p = f"q8_{i}_"
        new_inits += [
            numpy_helper.from_array(wq, p + "w"),
            numpy_helper.from_array(w_scale, p + "w_scale"),
            numpy_helper.from_array(np.array([-1, w.shape[0]], np.int64), p + "rows"),
            numpy_helper.from_array(np.array([w.shape[1]], np.int64), p + "width"),
        ]
        x, y = node.input[0], node.output[0]
        make = helper.make_node
        nodes += [
            # (..., K) -> (M, K): one row per token
            make("Shape", [x], [p + "shape"]),
            make("Reshape", [x, p + "rows"], [p + "x"]),
            # the token's scale: its largest magnitude / 127 (a token of zeros gets the smallest float)
            make("Abs", [p + "x"], [p + "abs"]),
            make("ReduceMax", [p + "abs", "q8_last_axis"], [p + "max"], keepdims=0),
            make("Mul", [p + "max", "q8_inv127"], [p + "scale0"]),
            make("Max", [p + "scale0", "q8_tiny"], [p + "scale"]),
            # symmetric int8 stored as uint8 around 128 (the fast u8 x s8 kernels)
            make("Shape", [p + "scale"], [p + "m"]),
            make("Expand", ["q8_zero_point", p + "m"], [p + "zp"]),
            make("QuantizeLinear", [p + "x", p + "scale", p + "zp"], [p + "xq"], axis=0),
            make("MatMulInteger", [p + "xq", p + "w", "q8_zero_point"], [p + "acc"]),
            make("Cast", [p + "acc"], [p + "accf"], to=TensorProto.FLOAT),
            make("Mul", [p + "accf", p + "w_scale"], [p + "yw"]),
            make("Unsqueeze", [p + "scale", "q8_last_axis"], [p + "col"]),
            make("Mul", [p + "yw", p + "col"], [p + "y"]),
            # (M, N) -> (..., N)
            make("Slice", [p + "shape", "q8_lead_from", "q8_lead_to"], [p + "lead"]),
            make("Concat", [p + "lead", p + "width"], [p + "out_shape"], axis=0),
            make("Reshape", [p + "y", p + "out_shape"], [y]),
        ]
        replaced.add(node.input[1])
    still_used = {name for n in nodes for name in n.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits + [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return proto


__all__ = [
    "SCHEME",
    "QuantizationError",
    "block_index",
    "is_weight_matmul",
    "output_block",
    "quantize_int8",
    "quantize_weights",
    "weight_matmuls",
]
