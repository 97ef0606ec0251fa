"""Model handling: loading with clear errors, graph queries, node naming, float regions (truncation, subgraphs).

Detector heads are found in sensq.heads.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import SensqError


def load_model(path: str | Path) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise SensqError(f"model file not found: {p}", "check the path given to --model / onnx_model")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        raise SensqError(f"cannot parse {p} as ONNX ({type(e).__name__})", "the file is corrupt or not an .onnx model; export it again") from e
    if len(model.graph.node) == 0:
        raise SensqError(f"{p} has no nodes", "the file is not a complete ONNX model; export it again")
    return model


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim (xquant's skip_onnxsim=false). Falls back to the model unchanged if the simplifier fails."""
    try:
        import onnxslim

        return onnxslim.slim(model)
    except Exception:
        return model


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every node of `model` a unique name, in place; returns how many were (re)named.

    Unnamed nodes (older exporters leave names empty) get '<op>_<index>'; a name that is already taken, by a
    node the exporter named or by an earlier duplicate, gets a '_<k>' suffix. ONNX Runtime's quantizer selects
    nodes by name (nodes_to_exclude, bias duplication), so two nodes with one name would both change precision.
    """
    nodes = model.graph.node
    given = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen or (name != node.name and name in given):
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


@dataclass
class Graph:
    """Index over a model's nodes: producers, consumers, names. Built once, read often."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    initializers: set[str] = field(default_factory=set)
    _shapes: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.initializers = {i.name for i in self.model.graph.initializer}
        name_nodes(self.model)  # in place: the builder, the reports and --float-nodes must see the same names
        for node in self.model.graph.node:
            self.nodes[node.name] = node
            for o in node.output:
                if o:
                    self.producer[o] = node
            for x in node.input:
                if x:
                    self.consumers[x].append(node)

    def shapes(self) -> dict[str, list]:
        """Tensor name -> dims (ints, or strings for symbolic dims) from ONNX shape inference, computed once."""
        if self._shapes is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model).graph
            except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError):
                # shapes only make labels richer; a model the inference rejects still works
                inferred = self.model.graph
            self._shapes = {}
            for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                    self._shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                            for d in v.type.tensor_type.shape.dim]
        return self._shapes

    @property
    def inputs(self) -> list[str]:
        return [i.name for i in self.model.graph.input if i.name not in self.initializers]

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def has_tensor(self, name: str) -> bool:
        return name in self.producer or name in self.inputs

    def downstream(self, tensors: list[str]) -> set[str]:
        """Names of all nodes that (transitively) consume any of `tensors`."""
        seen: set[str] = set()
        queue = deque(tensors)
        while queue:
            t = queue.popleft()
            for node in self.consumers.get(t, []):
                if node.name not in seen:
                    seen.add(node.name)
                    queue.extend(o for o in node.output if o)
        return seen

    def upstream(self, tensors: list[str], stop: set[str] = frozenset()) -> set[str]:
        """Names of all nodes that (transitively) produce any of `tensors`, not crossing tensors in `stop`."""
        seen: set[str] = set()
        queue = deque(t for t in tensors)
        while queue:
            t = queue.popleft()
            node = self.producer.get(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            queue.extend(x for x in node.input if x and x not in stop and x not in self.initializers)
        return seen

    def subgraph(self, input_names: list[str], output_names: list[str]) -> set[str]:
        """Nodes enclosed by boundary tensors (xquant custom_setting): between the inputs and the outputs."""
        missing = [t for t in list(input_names) + list(output_names) if not self.has_tensor(t)]
        if missing:
            raise SensqError(f"custom_setting tensor {missing[0]!r} not in graph", "check the tensor names in Netron (spelling, '_output_0' suffix)")
        back = self.upstream(list(output_names), stop=set(input_names))
        fwd = self.downstream(list(input_names)) if input_names else back
        nodes = back & fwd
        if not nodes:
            raise SensqError(f"custom_setting {input_names} -> {output_names} encloses no node", "the inputs must lie upstream of the outputs")
        return nodes

    def boundary(self, node_names: set[str]) -> tuple[list[str], list[str]]:
        """(inputs, outputs) tensors of a node set: the xquant custom_setting form of a float region."""
        produced = {o for n in node_names for o in self.nodes[n].output if o}
        ins = [x for n in sorted(node_names) for x in self.nodes[n].input
               if x and x not in produced and x not in self.initializers]
        outs = [o for o in produced
                if o in self.outputs or any(c.name not in node_names for c in self.consumers.get(o, []))]
        return list(dict.fromkeys(ins)), sorted(outs)


def truncation_region(graph: Graph, tensors: list[str]) -> tuple[set[str], list[str]]:
    """Nodes after xquant truncate_var_names (kept float) and warnings. Raises on the FAQ's 'truncate graph failed'."""
    warnings: list[str] = []
    for t in tensors:
        if not graph.has_tensor(t):
            raise SensqError(f"truncate graph failed: tensor {t!r} not in graph",
                             "open the model in Netron and copy the exact tensor name (e.g. '/model.22/Reshape_output_0')")
        if t in graph.outputs:
            raise SensqError(f"truncate graph failed: {t!r} is a model output, nothing comes after it",
                             "choose a tensor inside the graph, before the post-processing")
    after = graph.downstream(tensors)
    if not after:
        raise SensqError(f"truncate graph failed: nothing consumes {tensors}", "choose tensors that feed the post-processing")
    before = graph.upstream(graph.outputs, stop=set(tensors)) - after
    uncut = [n for n in before if any(o in graph.outputs for o in graph.nodes[n].output)]
    reach_outputs = set(graph.outputs) & {o for n in after for o in graph.nodes[n].output}
    if not reach_outputs:
        raise SensqError(f"truncate graph failed: {tensors} do not lead to any model output",
                         "choose tensors that split the model into backbone and post-processing")
    if uncut:
        warnings.append(f"truncate_var_names do not split the graph completely: output(s) {sorted(set(o for n in uncut for o in graph.nodes[n].output) & set(graph.outputs))} "
                        "are also reached without passing the cut")
    # An output reached both through and around the cut means a branch bypasses it (e.g. YOLOv8 class branch).
    bypass = [n for n in after if any(x in graph.producer and graph.producer[x].name in before and graph.producer[x].name not in after
                                      for x in graph.nodes[n].input if x not in tensors)]
    if bypass:
        warnings.append(f"{len(bypass)} node(s) after the cut also take inputs from a branch that bypasses it "
                        f"(e.g. {sorted(bypass)[0]}); that branch stays quantized unless its tensors are added to truncate_var_names")
    return after, warnings


def detect_yolo_head(graph: Graph):
    """Moved to sensq.heads (names, then graph structure); kept here for callers of the old location."""
    from .heads import detect_head

    return detect_head(graph)


def group_name(node_name: str, depth: int = 1) -> str:
    """Module prefix of a node: '/model.24/m.0/Conv' -> 'model.24' (depth 1), 'model.24/m.0' (depth 2)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) <= 1:
        return parts[0] if parts else node_name
    return "/".join(parts[: min(depth, len(parts) - 1)])
