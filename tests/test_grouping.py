"""Layer groups: module prefixes when names carry a module path, graph structure when they do not."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensq.config import config_from_dict
from sensq.errors import SensqError
from sensq.grouping import (
    MAX_GROUPS,
    describe_group,
    has_module_paths,
    layer_groups,
    structural_groups,
)
from sensq.heads import detect_head
from sensq.model import Graph, group_name
from sensq.quantize import load_and_simplify
from sensq.targets import get_target

QUANTIZED_OPS = set(get_target("ort-cpu", None).resolved_op_types())


def _residual_net(n_blocks: int, named: bool = False, concat_every: int = 4) -> onnx.ModelProto:
    """A stem conv, then n_blocks residual blocks (conv, relu, conv, add, relu) with a channel concat of two
    parallel convs every `concat_every` blocks; nodes unnamed unless `named`. Returns the model and its blocks."""
    rng = np.random.default_rng(0)
    c = 8
    nodes, inits = [], []

    def conv(x, out, cin=c, cout=c):
        w = f"w{len(inits)}"
        inits.append(numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.1, w))
        nodes.append(helper.make_node("Conv", [x, w], [out], pads=[1, 1, 1, 1]))

    conv("x", "stem", cin=3)
    nodes.append(helper.make_node("Relu", ["stem"], ["t0"]))
    x = "t0"
    for b in range(n_blocks):
        conv(x, f"b{b}c1")
        nodes.append(helper.make_node("Relu", [f"b{b}c1"], [f"b{b}r1"]))
        conv(f"b{b}r1", f"b{b}c2")
        nodes.append(helper.make_node("Add", [f"b{b}c2", x], [f"b{b}s"]))
        nodes.append(helper.make_node("Relu", [f"b{b}s"], [f"b{b}o"]))
        x = f"b{b}o"
        if b % concat_every == concat_every - 1:  # a CSP-like split: two convs joined by a Concat and a 1x1 conv
            conv(x, f"b{b}p", cout=c // 2)
            conv(x, f"b{b}q", cout=c // 2)
            nodes.append(helper.make_node("Concat", [f"b{b}p", f"b{b}q"], [f"b{b}cat"], axis=1))
            conv(f"b{b}cat", f"b{b}m")
            nodes.append(helper.make_node("Sigmoid", [f"b{b}m"], [f"b{b}g"]))
            nodes.append(helper.make_node("Mul", [f"b{b}m", f"b{b}g"], [f"b{b}act"]))
            x = f"b{b}act"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    if named:
        for i, n in enumerate(nodes):
            n.name = f"/model.{i // 6}/block/{n.op_type}_{i}"
    graph = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def graph_op(g: Graph, name: str) -> str:
    return g.nodes[name].op_type


def _quantizable(g: Graph) -> list[str]:
    return [n for n, node in g.nodes.items() if node.op_type in QUANTIZED_OPS]


def _check_partition(groups: dict[str, list[str]], nodes: list[str]):
    flat = [n for ms in groups.values() for n in ms]
    assert sorted(flat) == sorted(nodes) and len(flat) == len(set(flat)), "every given node in exactly one group"
    firsts = [nodes.index(ms[0]) for ms in groups.values()]
    assert firsts == sorted(firsts), "groups in graph order"


def test_three_hundred_node_unnamed_graph_gets_at_most_forty_groups():
    model = _residual_net(48)
    g = Graph(model)
    assert len(g.nodes) >= 300 and not has_module_paths(list(g.nodes))
    nodes = _quantizable(g)
    groups = layer_groups(g, nodes)  # auto: no module paths -> structure
    _check_partition(groups, nodes)
    assert 10 <= len(groups) <= MAX_GROUPS
    where = {n: k for k, ms in groups.items() for n in ms}
    for node in g.nodes.values():  # an activation stays with the conv it follows
        if node.op_type in ("Relu", "Sigmoid") and g.producer[node.input[0]].op_type == "Conv":
            assert where[node.name] == where[g.producer[node.input[0]].name]


def test_residual_blocks_become_groups_when_fine_enough():
    model = _residual_net(8, concat_every=100)
    g = Graph(model)
    nodes = _quantizable(g)
    groups = structural_groups(g, nodes, max_groups=100, cap=2)
    where = {n: k for k, ms in groups.items() for n in ms}
    # Each residual block (conv, relu, conv, add, relu after the add) is closed between its input and its Add:
    # one group per block, by construction of the graph (2 convs = cap).
    for b in range(8):
        members = {g.producer[t].name for t in (f"b{b}c1", f"b{b}r1", f"b{b}c2", f"b{b}s")}
        assert len({where[m] for m in members}) == 1, f"block {b} split"
    assert len({where[g.producer[f"b{b}c1"].name] for b in range(8)}) == 8  # and blocks are not merged (cap 2)
    # depth 2: one group per learned layer, no block merging
    fine = structural_groups(g, nodes, depth=2)
    assert len(fine) == sum(g.nodes[n].op_type == "Conv" for n in nodes)


def test_groups_hold_only_the_nodes_given():
    g = Graph(_residual_net(12))
    nodes = _quantizable(g)[::3]
    groups = layer_groups(g, nodes, by="structure")
    _check_partition(groups, nodes)


def test_labels_and_description_are_readable():
    g = Graph(_residual_net(4))
    groups = layer_groups(g, _quantizable(g))
    label, members = next(iter(groups.items()))
    assert label.startswith(f"{members[0]}..{members[-1]} [") and "Conv" in label and "x16x16]" in label
    text = describe_group(g, members)
    assert text.startswith(f"{members[0]} .. {members[-1]}: {len(members)} nodes (")
    n_conv = sum(g.nodes[m].op_type == "Conv" for m in members)
    assert f"{n_conv} Conv" in text and text.endswith("x16x16")


def test_module_names_group_by_prefix_and_module_falls_back_to_structure():
    named = Graph(_residual_net(6, named=True))
    nodes = _quantizable(named)
    assert has_module_paths(nodes)
    expected = {}
    for n in nodes:
        expected.setdefault(group_name(n, 1), []).append(n)
    # model.6 holds only block 5's residual Add and its Relu (no conv): not a toggle of its own, it joins the group
    # of its latest producer (block 5's second conv, in model.5)
    assert [graph_op(named, n) for n in expected["model.6"]] == ["Add", "Relu"]
    expected["model.5"] += expected.pop("model.6")
    assert layer_groups(named, nodes, by="auto") == expected == layer_groups(named, nodes, by="module")
    unnamed = Graph(_residual_net(6))
    plain = _quantizable(unnamed)
    assert layer_groups(unnamed, plain, by="module") == layer_groups(unnamed, plain, by="structure")
    assert layer_groups(unnamed, plain, by="node") == {n: [n] for n in plain}
    with pytest.raises(SensqError, match="unknown grouping"):
        layer_groups(unnamed, plain, by="layers")


@pytest.mark.parametrize("name", ["yolov5n.onnx", "yolov8n-arch-random.onnx", "yolo11n-arch-random.onnx",
                                  "yolo26n-arch-random.onnx", "yolo26n-e2e-arch-random.onnx"])
def test_name_stripped_detectors_get_tens_of_groups(data_dir, tmp_path, name):
    path = data_dir / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data")
    stripped = onnx.load(str(path))
    for i, node in enumerate(stripped.graph.node):
        node.name = f"{node.op_type}_{i}"
    onnx.save(stripped, str(tmp_path / "m.onnx"))
    g = Graph(load_and_simplify(config_from_dict({"model_parameters": {"onnx_model": str(tmp_path / "m.onnx")}})))
    head = detect_head(g)
    assert head is not None and head.source == "structure"
    nodes = [n for n in _quantizable(g) if n not in head.float_nodes]  # what sensitivity passes (decode float)
    groups = layer_groups(g, nodes)
    _check_partition(groups, nodes)
    assert 15 <= len(groups) <= MAX_GROUPS
