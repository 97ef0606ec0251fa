"""Layer groups: the units a sensitivity pass scores and a search toggles between float and INT8.

Any split is executable: ONNX Runtime runs a QDQ graph with any set of float nodes (a float node reads dequantized
values), so grouping only decides what is toggled together.

by="module"     the module prefix of each node name ('/model.24/m.0/Conv' -> 'model.24' at depth 1)
by="structure"  from the graph alone, for names without a module path ('Conv_41', '657'):
                  1. units: each learned layer (Conv/Gemm/MatMul with a constant weight) with the weight-free ops that
                     follow it while all their inputs come from that unit (activation, bias, pooling, reshapes);
                     a node joining several units (residual Add, Concat) goes to its latest input's unit;
                  2. blocks (depth 1): a branch whose paths meet again at one join, with nothing entering or leaving
                     in between (a residual block, a CSP/C3 block, SiLU's two paths), becomes one group when it holds
                     at most max(3, learned layers / 16) learned layers; then straight chains of groups merge under the same cap;
                  3. if more than MAX_GROUPS remain, neighbours in graph order (by depth) merge, smallest pair first.
                depth >= 2 stops after step 1 (one group per learned layer).
by="auto"       module prefixes when most names carry a module path, else structure
by="node"       one node each

A group without a learned layer (a Concat, a Resize, a residual Add on its own) is not a precision toggle: keeping it
float leaves the built model unchanged (its Q/DQ is the neighbours') or only moves Q/DQ around, so module and
structure groupings fold it into a neighbouring group (fold_weight_free) and every toggle is a distinct built model.
"""
from __future__ import annotations

import logging
from collections import Counter

from .errors import SensqError
from .model import Graph, group_name

log = logging.getLogger("sensq")

GROUPINGS = ("auto", "module", "structure", "node")
LEARNED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MIN_BLOCK_CAP = 3  # learned layers a merged block may hold at least (a residual or CSP block) ...
BLOCKS_PER_MODEL = 16  # ... or more in deep models, so that a model gives tens of groups, not hundreds
MAX_GROUPS = 40


def has_module_paths(names: list[str]) -> bool:
    """True when most node names carry a module path ('/model.24/m.0/Conv'), not just an op and a counter."""
    with_path = sum(1 for n in names if len([p for p in n.split("/") if p]) >= 2)
    return bool(names) and with_path * 2 >= len(names)


def layer_groups(graph: Graph, nodes: list[str], by: str = "auto", depth: int = 1) -> dict[str, list[str]]:
    """Group `nodes` (quantizable node names, graph order) -> {group label: node names}, groups in graph order.

    Groups hold only the nodes passed in. See the module docstring for the groupings."""
    if by not in GROUPINGS:
        raise SensqError(f"unknown grouping {by!r}", f"use one of {', '.join(GROUPINGS)}")
    if by == "node":
        return {n: [n] for n in nodes}
    if by in ("auto", "module") and has_module_paths(nodes):
        groups: dict[str, list[str]] = {}
        for n in nodes:
            groups.setdefault(group_name(n, depth), []).append(n)
        return fold_weight_free(graph, groups)
    if by == "module":  # one group per node otherwise: the structure is the only module information left
        log.info("node names carry no module path; grouping by graph structure")
    return fold_weight_free(graph, structural_groups(graph, nodes, depth))


def _is_learned(graph: Graph, name: str) -> bool:
    node = graph.nodes.get(name)
    return node is not None and node.op_type in LEARNED_OPS


def _nearest_grouped(graph: Graph, members: list[str], where: dict[str, str], upstream: bool) -> list[str]:
    """The nearest grouped nodes feeding (upstream) or reading (downstream) `members`, walking through nodes that are
    in no group (float or not quantized)."""
    seen, found = set(members), []
    stack = list(members)
    while stack:
        node = graph.nodes.get(stack.pop())
        if node is None:
            continue
        if upstream:
            nxt = [graph.producer[x].name for x in node.input if x in graph.producer]
        else:
            nxt = [c.name for o in node.output for c in graph.consumers.get(o, [])]
        for n in nxt:
            if n not in seen:
                seen.add(n)
                (found if n in where else stack).append(n)
    return found


def fold_weight_free(graph: Graph, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each group without a learned layer joins the group of its latest producer (graph order), else of its first
    consumer; the target keeps its label. Groups stay in graph order, members too. Unchanged when no group has a
    learned layer (nothing to fold into)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    if not any(_is_learned(graph, n) for ms in groups.values() for n in ms):
        return groups
    out = {k: list(v) for k, v in groups.items()}
    where = {n: k for k, ms in out.items() for n in ms}
    for label in list(out):
        members = out[label]
        if any(_is_learned(graph, n) for n in members):
            continue
        before = _nearest_grouped(graph, members, where, upstream=True)
        after = _nearest_grouped(graph, members, where, upstream=False)
        if not before and not after:
            continue  # nothing quantized around it: left as it is
        pos = lambda n: order.get(n, len(order))  # noqa: E731
        target = where[max(before, key=pos)] if before else where[min(after, key=pos)]
        out[target] = sorted(out[target] + members, key=pos)
        for n in members:
            where[n] = target
        del out[label]
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[1][0], len(order))))


# ---------------------------------------------------------------------------------------------------- structure
class _Sets:
    """Union-find over node names; the root of a set is its earliest member in graph order."""

    def __init__(self, order: dict[str, int]):
        self.order, self.parent = order, {n: n for n in order}

    def find(self, n: str) -> str:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, *names: str) -> str:
        roots = sorted({self.find(n) for n in names}, key=self.order.__getitem__)
        for r in roots[1:]:
            self.parent[r] = roots[0]
        return roots[0]


def _data_inputs(graph: Graph, node, constants: set[str]) -> list[str]:
    """Producer node names of a node's non-constant inputs."""
    return [graph.producer[x].name for x in node.input if x and x not in constants and x in graph.producer]


def _units(graph: Graph, constants: set[str]) -> _Sets:
    order = {n: i for i, n in enumerate(graph.nodes)}
    sets = _Sets(order)
    for name, node in graph.nodes.items():
        if node.op_type in LEARNED_OPS and len(node.input) > 1 and node.input[1] in constants:
            continue  # a learned layer starts a unit
        units = {sets.find(p) for p in _data_inputs(graph, node, constants)}
        if len(units) == 1:
            sets.union(name, units.pop())
    return sets


def _unit_dag(graph: Graph, sets: _Sets, constants: set[str]):
    succ: dict[str, set[str]] = {}
    pred: dict[str, set[str]] = {}
    for name, node in graph.nodes.items():
        u = sets.find(name)
        succ.setdefault(u, set())
        pred.setdefault(u, set())
        for p in _data_inputs(graph, node, constants):
            v = sets.find(p)
            if v != u:
                succ.setdefault(v, set()).add(u)
                pred[u].add(v)
    return succ, pred


def _topological(graph: Graph, sets: _Sets, constants: set[str]):
    """(succ, pred, units in topological order) of the unit graph; units on a cycle (merging can close one) are
    merged first."""
    while True:
        succ, pred = _unit_dag(graph, sets, constants)
        indeg = {u: len(pred[u]) for u in succ}
        ready = sorted((u for u, d in indeg.items() if d == 0), key=sets.order.__getitem__, reverse=True)
        topo = []
        while ready:
            u = ready.pop()
            topo.append(u)
            for v in sorted(succ[u], key=sets.order.__getitem__, reverse=True):
                indeg[v] -= 1
                if indeg[v] == 0:
                    ready.append(v)
        if len(topo) == len(succ):
            return succ, pred, topo
        stuck = [u for u in succ if indeg[u] > 0]  # on or behind a cycle: merge one cycle and retry
        sets.union(*_a_cycle(stuck, pred))


def _a_cycle(stuck: list[str], pred) -> list[str]:
    """Units Kahn's algorithm could not order each keep a predecessor among them: walking back finds a cycle."""
    left = set(stuck)
    path, seen = [stuck[0]], {stuck[0]: 0}
    while True:
        nxt = next(v for v in sorted(pred[path[-1]]) if v in left)
        if nxt in seen:
            return path[seen[nxt]:]
        seen[nxt] = len(path)
        path.append(nxt)


def _absorb_weight_free(graph: Graph, sets: _Sets, constants: set[str]) -> None:
    """A unit without a learned layer (a join such as a residual Add or a Concat, or ops on the raw input) joins the
    unit of its latest producer, or of its first consumer when it has none."""
    succ, pred = _unit_dag(graph, sets, constants)
    learned = {sets.find(n) for n, node in graph.nodes.items() if node.op_type in LEARNED_OPS}
    for u in sorted(succ, key=sets.order.__getitem__):
        if u in learned:
            continue
        others = pred[u] or succ[u]
        if others:
            target = max(others, key=sets.order.__getitem__) if pred[u] else min(others, key=sets.order.__getitem__)
            sets.union(u, target)


def _size(members: dict[str, list[str]], graph: Graph, u: str) -> int:
    return sum(graph.nodes[n].op_type in LEARNED_OPS for n in members[u])


def _merge_blocks(graph: Graph, sets: _Sets, constants: set[str], cap: int) -> None:
    """Single-entry / single-exit regions between a branch and the join that ends it become one unit."""
    succ, pred, topo = _topological(graph, sets, constants)
    index = {u: i for i, u in enumerate(topo)}
    pdom: dict[str, set[str]] = {}
    for u in reversed(topo):  # post-dominators; outputs lead to a virtual sink
        ss = [({s} | pdom[s]) for s in succ[u]]
        pdom[u] = set.intersection(*ss) if ss else set()
    members: dict[str, list[str]] = {}
    for n in graph.nodes:
        members.setdefault(sets.find(n), []).append(n)
    candidates = []
    for b in topo:
        if len(succ[b]) < 2 or not pdom[b]:
            continue
        j = min(pdom[b], key=index.__getitem__)  # immediate post-dominator
        forward, stack = set(), list(succ[b])
        while stack:
            u = stack.pop()
            if u not in forward and index[u] <= index[j]:
                forward.add(u)
                stack.extend(succ[u])
        backward, stack = {j}, [j]
        while stack:
            for p in pred[stack.pop()]:
                if p not in backward and index[p] > index[b]:
                    backward.add(p)
                    stack.append(p)
        region = forward & backward
        closed = all(pred[u] <= region | {b} for u in region) and all(succ[u] <= region for u in region - {j})
        size = sum(_size(members, graph, u) for u in region)
        if closed and size <= cap:
            candidates.append((size, index[b], region))
    for _, _, region in sorted(candidates, key=lambda c: (c[0], c[1])):
        roots = {sets.find(u) for u in region}
        if sum(_size(members, graph, r) for r in roots) <= cap or len(roots) == 1:
            merged = sets.union(*roots)
            members[merged] = [n for r in roots for n in members.pop(r)]


def _merge_chains(graph: Graph, sets: _Sets, constants: set[str], cap: int) -> None:
    """A unit whose only successor has it as its only predecessor merges with it (a straight run of layers)."""
    succ, pred = _unit_dag(graph, sets, constants)
    members: dict[str, list[str]] = {}
    for n in graph.nodes:
        members.setdefault(sets.find(n), []).append(n)
    for u in sorted(succ, key=sets.order.__getitem__):
        if len(succ[u]) != 1:
            continue
        v = next(iter(succ[u]))
        ru, rv = sets.find(u), sets.find(v)
        if len(pred[v]) == 1 and ru != rv and _size(members, graph, ru) + _size(members, graph, rv) <= cap:
            merged = sets.union(ru, rv)
            members[merged] = members.pop(ru) + members.pop(rv) if merged == ru else members.pop(rv) + members.pop(ru)


def structural_groups(graph: Graph, nodes: list[str], depth: int = 1, max_groups: int = MAX_GROUPS,
                      cap: int | None = None) -> dict[str, list[str]]:
    """Groups of `nodes` from graph structure (module docstring, by="structure"), in graph order."""
    constants = graph.initializers | {o for n in graph.nodes.values() if n.op_type == "Constant" for o in n.output}
    sets = _units(graph, constants)
    _absorb_weight_free(graph, sets, constants)
    if cap is None:
        learned = sum(1 for n in nodes if n in graph.nodes and graph.nodes[n].op_type in LEARNED_OPS)
        cap = max(MIN_BLOCK_CAP, -(-learned // BLOCKS_PER_MODEL))
    if depth <= 1:
        _merge_blocks(graph, sets, constants, cap)
        _merge_chains(graph, sets, constants, cap)
    wanted = set(nodes)
    blocks: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n in wanted:
            blocks.setdefault(sets.find(n), []).append(n)
    extra = [n for n in nodes if n not in graph.nodes]  # nodes only the builder's copy has (opset conversion)
    ordered = sorted(blocks.values(), key=lambda ms: sets.order[ms[0]]) + [[n] for n in extra]
    if depth <= 1:
        ordered = _merge_by_depth(graph, ordered, max_groups)
    return {group_label(graph, ms): ms for ms in ordered}


def _merge_by_depth(graph: Graph, groups: list[list[str]], max_groups: int) -> list[list[str]]:
    """Merge neighbours in graph order, the pair with the fewest learned layers first, until max_groups remain."""
    def learned(ms):
        return sum(graph.nodes[n].op_type in LEARNED_OPS for n in ms if n in graph.nodes) or 0.5

    groups = [list(g) for g in groups]
    while len(groups) > max_groups:
        i = min(range(len(groups) - 1), key=lambda k: (learned(groups[k]) + learned(groups[k + 1]), k))
        groups[i:i + 2] = [groups[i] + groups[i + 1]]
    return groups


# ------------------------------------------------------------------------------------------------------- labels
def _shape_text(graph: Graph, members: list[str]) -> str:
    known = [n for n in members if n in graph.nodes]
    if not known:
        return "?"
    _, outs = graph.boundary(set(known))
    order = {o: i for i, n in enumerate(graph.nodes) for o in graph.nodes[n].output}
    outs = sorted(outs, key=lambda o: order.get(o, -1))
    dims = graph.shapes().get(outs[-1]) if outs else None
    return "x".join(str(d) for d in dims) if dims else "?"


def group_label(graph: Graph, members: list[str]) -> str:
    """'first..last [k Op -> shape]': the group's first and last node, its learned layers and its output shape."""
    ops = Counter(graph.nodes[n].op_type for n in members if n in graph.nodes)
    main = [f"{c} {op}" for op, c in ops.most_common() if op in LEARNED_OPS]
    if not main and ops:
        main = [ops.most_common(1)[0][0]]
    span = members[0] if len(members) == 1 else f"{members[0]}..{members[-1]}"
    return f"{span} [{', '.join(main)} -> {_shape_text(graph, members)}]"


def describe_group(graph: Graph, members: list[str]) -> str:
    """One line for reports: first and last node, node count by op type, output shape(s)."""
    ops = Counter(graph.nodes[n].op_type for n in members if n in graph.nodes)
    span = members[0] if len(members) == 1 else f"{members[0]} .. {members[-1]}"
    counts = ", ".join(f"{c} {op}" for op, c in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{span}: {len(members)} nodes ({counts}) -> {_shape_text(graph, members)}"
