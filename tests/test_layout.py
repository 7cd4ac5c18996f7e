"""The modules import one way, in the README's order (a file imports only files before it)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["data", "losses", "schedule", "stats", "optim", "parallel", "robust", "teachers", "checkpoint", "eval", "train",
         "attack", "ablation", "figures"]
OPTIONAL = {"datasets"}  # optional dependencies may be imported inside the function that needs them


def imports(module):
    """(imported top-level name, whether the import sits inside a function) of every import statement."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.append((child.module.split(".")[0], in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def test_each_module_imports_only_modules_below_it():
    for i, module in enumerate(ORDER):
        project = [name for name, _ in imports(module) if name in ORDER]
        above = [name for name in project if ORDER.index(name) >= i]
        assert not above, f"{module}.py imports {above}, which are not below it in {ORDER}"


def test_no_import_inside_a_function_except_optional_dependencies():
    for module in ORDER:
        inside = [name for name, in_function in imports(module) if in_function and name not in OPTIONAL]
        assert not inside, f"{module}.py imports {inside} inside a function"


def test_the_checker_sees_a_circle(tmp_path, monkeypatch):
    """The test above would fail on a module that imports one above it, at top level or in a function."""
    (tmp_path / "data.py").write_text("import json\n\ndef f():\n    import train\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert imports("data") == [("json", False), ("train", True)]
