"""The one-way import rule of docs/architecture.md, read from the source (ast, nothing imported).

hakubooru/ never imports trainers/. Inside trainers/lokr/ each unit imports only the units
below it: the loop (train, state, cache, __main__) → observe → network, data → sdxl, optim → the
leaf modules (config, distributed, safetensors_file), which import no other trainer module;
network and data never import each other; and no module reaches itself through its imports."""
import ast
from pathlib import Path

from tests.helpers import REPO

LOKR = "trainers.lokr"
LEAVES = {"config", "distributed", "safetensors_file"}
LOOP = {"train", "state", "cache", "__main__"}
RANK = {"leaf": 0, "sdxl": 1, "optim": 1, "data": 2, "network": 2, "observe": 3, "loop": 4}
TOP_MODULES_MAX = 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (a function-level import counts too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def unit(module: str) -> str | None:
    """The unit of a trainers.lokr module: leaf, sdxl, optim, data, network, observe or loop."""
    if not module.startswith(LOKR + "."):
        return None
    head = module[len(LOKR) + 1:].split(".")[0]
    if head in LEAVES:
        return "leaf"
    if head in LOOP:
        return "loop"
    return head if head in RANK else None


def graph(files) -> dict[str, set[str]]:
    known = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports(p) if m in known} for p in files}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the rule, as 'importer -> imported: why'."""
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if src.startswith("hakubooru") and dst.startswith("trainers"):
                out.append(f"{src} -> {dst}: the data library imports its trainer")
            us, ud = unit(src), unit(dst)
            if us is None or ud is None or src == dst:
                continue
            if us == "leaf":
                out.append(f"{src} -> {dst}: a leaf module imports another trainer module")
            elif us != ud and RANK[ud] >= RANK[us]:
                out.append(f"{src} -> {dst}: {us} may not import {ud}")
    return out + cycles(edges)


def cycles(edges: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append("circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def project_files():
    return sorted([*(REPO / "hakubooru").rglob("*.py"), *(REPO / "trainers").rglob("*.py")])


def test_imports_flow_one_way():
    assert violations(graph(project_files())) == []


def test_every_trainer_module_has_a_unit():
    lokr = [module_name(p) for p in (REPO / "trainers" / "lokr").rglob("*.py") if p.name != "__init__.py"]
    assert [m for m in lokr if unit(m) is None] == []


def test_the_top_of_the_trainer_stays_small():
    top = sorted(p.name for p in (REPO / "trainers" / "lokr").glob("*.py"))
    assert len(top) <= TOP_MODULES_MAX, top


def test_the_checker_sees_each_kind_of_break():
    # an upward import, a peer import, a leaf importing, and a circle, each reported once
    edges = {"hakubooru.report": {"trainers.lokr.config"},
             "trainers.lokr.sdxl.model": {"trainers.lokr.network.lokr"},
             "trainers.lokr.network.lokr": {"trainers.lokr.data.index"},
             "trainers.lokr.config": {"trainers.lokr.distributed"},
             "trainers.lokr.data.a": {"trainers.lokr.data.b"}, "trainers.lokr.data.b": {"trainers.lokr.data.a"}}
    found = violations(edges)
    assert [v.split(":")[0] for v in found] == [
        "hakubooru.report -> trainers.lokr.config", "trainers.lokr.config -> trainers.lokr.distributed",
        "trainers.lokr.network.lokr -> trainers.lokr.data.index", "trainers.lokr.sdxl.model -> trainers.lokr.network.lokr",
        "circle"], found
    assert found[-1] == "circle: trainers.lokr.data.a -> trainers.lokr.data.b -> trainers.lokr.data.a"


def test_relative_imports_are_resolved():
    pkg = REPO / "hakubooru" / "commands" / "report.py"
    assert {"hakubooru.errors", "hakubooru.manifest", "hakubooru.report"} <= imports(pkg)
