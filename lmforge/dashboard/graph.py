"""The lineage graph around one run: back to the raw inputs and forward to every run that used its artifact.

Nodes are runs (``run:<id>``) and raw inputs (``raw:<path>``); an edge ``a -> b`` with a role says ``b`` read ``a``.
``layout`` places upstream nodes in columns to the left of the focus, downstream ones to the right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.dashboard.store import Store

MAX_NODES = 300


@dataclass
class Node:
    key: str
    label: str
    sub: str
    run_id: str | None = None
    state: str = "raw"
    layer: int = 0
    y: int = 0


@dataclass
class Graph:
    focus: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (src key, dst key, role)
    truncated: bool = False


def _run_node(run: dict[str, Any]) -> Node:
    return Node(f"run:{run['run_id']}", run["stage"], _short(run["path"]), run["run_id"], run["state"])


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def build(store: Store, run_id: str) -> Graph:
    focus = store.run(run_id)
    g = Graph(focus=f"run:{run_id}")
    g.nodes[g.focus] = _run_node(focus)
    # upstream: breadth first over the edges into each run
    frontier = [(focus, 0)]
    seen = {run_id}
    while frontier and len(g.nodes) < MAX_NODES:
        run, layer = frontier.pop(0)
        for e in store.inputs_of(run["run_id"]):
            fp = e.get("src_fingerprint") or ""
            src = None
            if fp.startswith("run:"):
                try:
                    src = store.run(fp[4:])
                except Exception:  # noqa: BLE001 - a run missing from the registry is drawn as a raw input
                    src = None
            if src is None:
                src = store.run_at(e["src"])
            if src is None and not fp.startswith("run:"):  # a file inside another run's artifact folder
                src = store.run_containing(e["src"], run["started_at"])
            if src is None:
                key = f"raw:{e['src']}"
                g.nodes.setdefault(key, Node(key, "raw input", _short(e["src"]), None, "raw", layer - 1))
            else:
                key = f"run:{src['run_id']}"
                if key not in g.nodes:
                    g.nodes[key] = _run_node(src)
                    g.nodes[key].layer = layer - 1
                if src["run_id"] not in seen:
                    seen.add(src["run_id"])
                    frontier.append((src, layer - 1))
            g.edges.append((key, f"run:{run['run_id']}", e["role"]))
    # downstream: every run whose inputs name this run's folder (or its run id)
    frontier = [(focus, 0)]
    down_seen = {run_id}
    while frontier and len(g.nodes) < MAX_NODES:
        run, layer = frontier.pop(0)
        for e in store.users_of(run["path"], run["run_id"]):
            try:
                dst = store.run(e["dst_run"])
            except Exception:  # noqa: BLE001 - an edge to a vanished run is skipped
                continue
            key = f"run:{dst['run_id']}"
            if key not in g.nodes:
                g.nodes[key] = _run_node(dst)
                g.nodes[key].layer = layer + 1
            edge = (f"run:{run['run_id']}", key, e["role"])
            if edge not in g.edges:
                g.edges.append(edge)
            if dst["run_id"] not in down_seen:
                down_seen.add(dst["run_id"])
                frontier.append((dst, layer + 1))
    g.truncated = len(g.nodes) >= MAX_NODES
    return g


W, H, GAP_X, GAP_Y = 190, 46, 80, 22


def layout(g: Graph) -> dict[str, Any]:
    """Positions for the SVG: ``{"width", "height", "nodes": [...], "edges": [...]}`` (pixels)."""
    layers = sorted({n.layer for n in g.nodes.values()})
    cols: dict[int, list[Node]] = {l: [] for l in layers}
    for n in g.nodes.values():
        cols[n.layer].append(n)
    tallest = max((len(c) for c in cols.values()), default=1)
    height = tallest * (H + GAP_Y) + GAP_Y
    pos: dict[str, tuple[int, int]] = {}
    for i, l in enumerate(layers):
        col = sorted(cols[l], key=lambda n: (n.label, n.sub))
        top = (height - len(col) * (H + GAP_Y)) // 2 + GAP_Y // 2
        for j, n in enumerate(col):
            pos[n.key] = (20 + i * (W + GAP_X), top + j * (H + GAP_Y))
    nodes = [{"key": n.key, "label": n.label, "sub": n.sub, "run_id": n.run_id, "state": n.state,
              "x": pos[n.key][0], "y": pos[n.key][1], "focus": n.key == g.focus} for n in g.nodes.values()]
    edges = []
    for src, dst, role in g.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        sx, sy, dx, dy = x1 + W, y1 + H // 2, x2, y2 + H // 2
        mid = (sx + dx) / 2
        edges.append({"src": src, "dst": dst, "role": role, "d": f"M{sx},{sy} C{mid},{sy} {mid},{dy} {dx},{dy}",
                      "lx": mid, "ly": (sy + dy) / 2 - 4})
    return {"width": 40 + len(layers) * (W + GAP_X) - GAP_X, "height": height, "nodes": nodes, "edges": edges,
            "w": W, "h": H}
