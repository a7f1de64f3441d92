"""The import rules of DESIGN.md, checked on the source: dependencies run one way, no cycles, and
imports inside functions only where a heavy optional import or the import order needs them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO

PACKAGES = ("ocrsite", "scans", "vllm_control", "api")
# The project package composes both apps; its leaf modules (no app imports) are what the apps may use.
OCRSITE_LEAVES = {"ocrsite.env", "ocrsite.live", "ocrsite.database", "ocrsite.metrics"}
# Imports inside functions, each with its reason. Anything else goes at the top of its module.
DEFERRED_IMPORTS = {
    ("scans.pipeline.rapidocr_engine", "rapidocr_onnxruntime"): "heavy (onnxruntime): loaded on first use",
    ("scans.pipeline.rapidocr_engine", "cv2"): "heavy (OpenCV): loaded on first use",
    ("scans.pipeline.rapidocr_engine", "numpy"): "only needed with the RapidOCR engine",
    ("scans.pipeline.tesseract_engine", "tesserocr"): "loads libtesseract (about 110 ms): only with the Tesseract engine",
    ("api.apps", "api"): "AppConfig.ready: signal receivers and schema extensions import models, loaded after app configs",
    ("api.apps", "scans.signals"): "AppConfig.ready: scans.signals imports scans.models",
    ("ocrsite.apps", "scans.pipeline"): "AppConfig.ready: the CPU engines' modules import the settings model",
    ("ocrsite.apps", "scans"): "AppConfig.ready: scans.selectors (the model server's demand) imports the models",
    ("ocrsite.apps", "vllm_control.config"): "AppConfig.ready: vllm_control.config imports the settings model",
    ("scans.pipeline.line_boxes", "scans.text_lines"): "heavy (OpenCV, onnxruntime): only with OCRSITE_VLM_LINE_BOXES",
    ("scans.text_layer", "fontTools.fontBuilder"): "about 120 ms to import, used once per process to build the PDF font",
    ("scans.text_layer", "fontTools.pens.ttGlyphPen"): "about 120 ms to import, used once per process to build the PDF font",
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, module: str) -> Iterator[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                yield base, in_function
                for alias in child.names:  # `from scans import services` imports scans.services
                    yield f"{base}.{alias.name}", in_function
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only
            else:
                yield from visit(child, nested)

    yield from visit(tree, False)


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def project_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        graph[module] = {name for name, _ in imports(path, module) if name in known and name != module}
    return graph


def test_the_model_server_app_never_imports_the_scans_app():
    offenders = [
        (module, name)
        for module, path in modules().items()
        if module.startswith("vllm_control")
        for name, _ in imports(path, module)
        if name == "scans" or name.startswith("scans.")
    ]
    assert offenders == []


def test_the_api_is_an_edge_no_other_app_imports():
    """`api` may use `scans` and `vllm_control`; neither app imports `api` (scans tells it about finished
    scans with the scan_finished signal). Only the project package composes it in."""
    offenders = [
        (module, name)
        for module, path in modules().items()
        if module.startswith(("scans", "vllm_control"))
        for name, _ in imports(path, module)
        if name == "api" or name.startswith("api.")
    ]
    assert offenders == []
    graph = project_graph()
    api_uses = {name.split(".")[0] for module, names in graph.items() if module.startswith("api") for name in names}
    assert api_uses <= {"api", "scans", "vllm_control", "ocrsite"}


def test_the_apps_use_only_the_leaf_modules_of_the_project_package():
    known = modules()
    offenders = [
        (module, name)
        for module, path in known.items()
        if not module.startswith("ocrsite")
        for name, _ in imports(path, module)
        if name in known and name.startswith("ocrsite.") and name not in OCRSITE_LEAVES
    ]
    assert offenders == []
    graph = project_graph()
    for leaf in OCRSITE_LEAVES:
        assert not {name for name in graph[leaf] if not name.startswith("ocrsite")}, f"{leaf} must not import the apps"


def test_no_import_cycles():
    graph = project_graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def walk(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    # A package's __init__ importing nothing of its own makes `pkg` -> `pkg.mod` edges harmless; none
    # of ours import anything, so every cycle found is a real one.
    assert cycles == []


def test_imports_inside_functions_are_the_listed_ones():
    found = {
        (module, name)
        for module, path in modules().items()
        for name, in_function in imports(path, module)
        if in_function
    }
    # `from x import y` yields both x and x.y; compare on what the statement names.
    listed = set(DEFERRED_IMPORTS)
    unlisted = {(module, name) for module, name in found if (module, name) not in listed and (module, name.rpartition(".")[0]) not in listed}
    assert unlisted == set(), "import at the top of the module, or list it here with its reason"
