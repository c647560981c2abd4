"""The layering contract: no import runs back up a layer (docs/architecture.md, "Layers").

Every module of kem (``kem/``, ``stores/`` as ``kem.stores``, ``adapters/`` as ``kem.adapters``) belongs to
one layer; a module may import its own layer and the layers below it, never one above. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count; imports inside functions do. A module that is
not in any layer fails the test, so a new module has to be placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# top to bottom; a prefix names a module and everything under it. The first matching row wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("commands", ("kem.__main__", "kem.cli", "kem.demo", "kem.server.serve_cli", "kem.server.__main__",
                  "kem.server.keys_cli", "kem.eval.eval_cli", "kem.consolidation.consolidate_cli", "kem.follower.follower_cli")),
    ("server", ("kem.server",)),
    ("consolidation", ("kem.consolidation",)),
    ("eval", ("kem.eval",)),
    ("fast path and engines", ("kem.editor", "kem.sync", "kem.tenants", "kem.versions", "kem.memory", "kem.chains",
                               "kem.compose", "kem.scope", "kem.relations", "kem.index", "kem.embedding",
                               "kem.onnx_export", "kem.datasets", "kem.adapters", "kem.follower")),
    ("stores", ("kem.stores",)),
    ("base", ("kem.edit", "kem.errors", "kem.protocols", "kem.settings", "kem.files", "kem.keys", "kem.joblock",
              "kem.provenance", "kem.runtime", "kem.models", "kem.cli_support")),
]
# the package's own __init__ re-exports the public API from above it: it is the entry, not a layer
ENTRY = {"kem"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("stores", "adapters"):
        parts = ["kem", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for d in ("kem", "stores", "adapters") for p in (ROOT / d).rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The kem modules ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                    (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known}


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_is_in_a_layer():
    unplaced = sorted(m for m in modules() if m not in ENTRY and layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


def test_no_import_runs_back_up_a_layer():
    mods = modules()
    known = set(mods)
    upward = []
    for name, path in sorted(mods.items()):
        if name in ENTRY:
            continue
        mine = layer_of(name)
        for dep in sorted(imports(path, known)):
            theirs = layer_of(dep)
            if dep in ENTRY or (mine is not None and theirs is not None and theirs < mine):
                upward.append(f"{name} ({LAYERS[mine][0] if mine is not None else '?'}) -> {dep} "
                              f"({LAYERS[theirs][0] if theirs is not None else 'kem'})")
    assert not upward, "imports that run back up a layer:\n" + "\n".join(upward)


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker itself: a planted upward import is found."""
    planted = tmp_path / "planted.py"
    planted.write_text("from kem.server.serving import Serving\n\nif TYPE_CHECKING:\n    import kem.editor\n")
    assert imports(planted, set(modules())) == {"kem.server.serving"}
    assert layer_of("kem.stores.sqlite") > layer_of("kem.server.serving")  # type: ignore[operator]


# Where a Settings() may be built from the environment: the commands, and the documented entry points of the
# Python API (KnowledgeEditor.open / in_memory, consolidate(), run_eval and its EvalContext, the dataset
# readers, and open_store for callers with only a URL). Everything else receives the settings it is given.
SETTINGS_BUILDERS = {"kem.settings", "kem.cli", "kem.demo", "kem.server.serve_cli", "kem.server.keys_cli",
                     "kem.eval.eval_cli", "kem.follower.follower_cli", "kem.consolidation.consolidate_cli",
                     "kem.editor", "kem.consolidation.job", "kem.eval.run", "kem.eval.eval_methods", "kem.datasets",
                     "kem.stores"}


def test_settings_are_built_only_at_entry_points():
    hidden = []
    for name, path in sorted(modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            built = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Settings" \
                and not node.args and not node.keywords
            factory = isinstance(node, ast.keyword) and node.arg == "default_factory" \
                and isinstance(node.value, ast.Name) and node.value.id == "Settings"
            if (built or factory) and name not in SETTINGS_BUILDERS:
                hidden.append(f"{name}:{getattr(node, 'lineno', getattr(node.value, 'lineno', '?'))}")
    assert not hidden, f"Settings() built from the environment outside an entry point: {hidden}"


def test_library_functions_take_typed_settings():
    """No ``settings: Any`` (or ``object``) parameter: settings are :class:`kem.settings.Settings`."""
    loose = []
    for name, path in sorted(modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*node.args.args, *node.args.kwonlyargs]:
                    ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                    if arg.arg == "settings" and ("Any" in ann or ann in ("object", "")):
                        loose.append(f"{name}.{node.name}")
    assert not loose, f"settings parameters that are not typed Settings: {loose}"


def test_library_file_names_are_unique():
    """One file name, one module: ``kem/server/serve_cli.py``, not a fifth ``cli.py``. Package ``__init__``,
    ``__main__`` and a method folder's fixed parts (``hparams.py``, ``main.py``: the plug-in shape,
    docs/architecture.md) are exempt."""
    exempt = {"__init__.py", "__main__.py", "hparams.py", "main.py", "solve.py", "train.py", "data.py"}
    seen: dict[str, list[str]] = {}
    for name, path in modules().items():
        if path.name not in exempt:
            seen.setdefault(path.name, []).append(name)
    repeated = {f: sorted(m) for f, m in seen.items() if len(m) > 1}
    assert not repeated, f"file names used twice in the library: {repeated}"
