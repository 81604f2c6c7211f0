"""The package's layout is its pipeline: a stage imports only from stages before it."""

import ast
from pathlib import Path

import collie_compile

PACKAGE = Path(collie_compile.__file__).parent
# Shared vocabulary first, then the stages in the order data flows through them.
ORDER = ["leaf", "kernels", "models", "capture", "optim", "cost", "planner", "passes",
         "data", "runtime", "training", "entry"]
LEAVES = {"errors", "dtypes", "dtensor", "layout", "recompute_policy", "config", "disk_cache"}
ENTRIES = {"__init__", "__main__", "cli", "launcher"}


def _stage(module: str) -> str:
    """The stage of a dotted module name under collie_compile."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ENTRIES:
        return "entry"
    return "leaf" if parts[0] in LEAVES else parts[0]


def _sources() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        found[".".join(["collie_compile", *rel.parts])] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """collie_compile modules ``path`` imports, anywhere in it (lazy imports too)."""
    out = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base == "collie_compile":  # from collie_compile import x: x is the module
                out |= {f"collie_compile.{a.name}" for a in node.names if a.name != "__version__"}
            elif base.startswith("collie_compile"):
                out.add(base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("collie_compile")}
    return out


def test_no_stage_imports_a_later_one():
    sources = _sources()
    assert len(sources) > 30 and "collie_compile.runtime.parallel_model" in sources
    wrong = []
    for module, path in sources.items():
        mine = ORDER.index(_stage(module))
        for target in _imports(module, path):
            if ORDER.index(_stage(target)) > mine:
                wrong.append(f"{module} ({_stage(module)}) imports {target} ({_stage(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_backward_import():
    # the rule would pass vacuously if _imports found nothing
    found = _imports("collie_compile.cost.estimate", _sources()["collie_compile.cost.estimate"])
    assert "collie_compile.cost.profile" in found and "collie_compile.models.registry" in found
    assert ORDER.index(_stage("collie_compile.training.run")) > ORDER.index(_stage(
        "collie_compile.cost.memory"))
