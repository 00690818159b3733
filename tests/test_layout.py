"""The layout's rules (docs/architecture.md), checked on the source: one room per concern."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "pipeline"


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE.parent)): imports(p) for p in PACKAGE.rglob("*.py")}


def test_only_the_cli_imports_click() -> None:
    users = {
        name for name, found in modules().items() if any(m.split(".")[0] == "click" for m in found)
    }
    assert users and all(
        name.startswith("pipeline/cli/") or name == "pipeline/tools/clidoc.py" for name in users
    ), users


def test_the_cache_package_is_imported_through_its_surface_and_knows_no_models() -> None:
    for name, found in modules().items():
        inside = name.startswith("pipeline/cache/")
        private = {m for m in found if m.startswith("kdpipe.cache.")}
        # outputs.py (the output guard) takes Location alone: the surface imports torch, and
        # the table commands that write files must stay light
        if name == "pipeline/base/outputs.py":
            private -= {"kdpipe.cache.location"}
        assert inside or not private, f"{name} imports {private}: use kdpipe.cache"
        if inside:
            knows = {
                m
                for m in found
                if m.startswith("kdpipe.")
                and not m.startswith(
                    ("kdpipe.cache", "kdpipe.base.errors", "kdpipe.base.spec", "kdpipe.base.checks")
                )
            }
            assert not knows, f"{name} imports {knows}: the cache knows no models"


def test_only_the_detection_room_imports_ultralytics() -> None:
    """Ultralytics is AGPL-3.0 and an optional extra: the MIT core never imports it."""
    users = {
        name
        for name, found in modules().items()
        if any(m.split(".")[0] == "ultralytics" for m in found)
    }
    assert users and all(name.startswith("pipeline/tasks/detect/") for name in users), users


def test_losses_do_no_io() -> None:
    found = modules()["pipeline/tasks/classify/loss.py"]
    assert found <= {"__future__", "torch", "torch.nn.functional", "kdpipe.base.checks"}, found
    # the checks of T and alpha the losses share with the CLI are pure too
    checks = modules()["pipeline/base/checks.py"]
    assert checks <= {"__future__", "math", "numbers", "kdpipe.base.errors"}, checks


def test_no_function_is_much_longer_than_a_screen() -> None:
    """The longest today are Manifest.from_dict (one line per field) and the CLI's
    training_options (one entry per option), about 80 lines each."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 90:
                    too_long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not too_long, too_long


def test_every_package_folder_is_installed_as_kdpipe() -> None:
    """The source folder is pipeline/, the import name kdpipe: setuptools cannot rename a
    folder it finds, so pyproject.toml lists the packages; a new folder must be added."""
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(("kdpipe", *init.parent.relative_to(PACKAGE).parts))
        for init in PACKAGE.rglob("__init__.py")
    }
    assert pyproject["tool"]["setuptools"]["package-dir"] == {"kdpipe": "pipeline"}
    assert listed == folders, f"pyproject.toml's packages differ: {sorted(listed ^ folders)}"


def test_the_folder_list_shows_the_architecture() -> None:
    """Issue 25, step 0: no flat heap of modules; the top level holds the rooms (each a
    package whose docstring says what it owns, as docs/architecture.md does) and the public
    API alone."""
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "api.py"}, top
    rooms = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"tasks", "data", "models", "views", "cache", "train", "export", "check"} <= rooms
    assert {p.parent.name for p in (PACKAGE / "tasks").glob("*/__init__.py")} >= {
        "classify",
        "detect",
    }
    architecture = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for init in PACKAGE.glob("*/**/__init__.py"):
        room = init.parent.relative_to(PACKAGE).as_posix()
        assert ast.get_docstring(ast.parse(init.read_text())), f"{room}/ says nothing of itself"
        assert f"`{room}/`" in architecture, f"docs/architecture.md does not name {room}/"
