"""The layer rules of docs/design.md, read from the source: imports flow down, and the layers that
sit beside the stack (models, distributed) use it only through its public entry points."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastattn"

# package (a folder of fastattn/) -> module prefixes its files must not import
FORBIDDEN = {
    "models": ("fastattn.reference", "fastattn.backends", "fastattn.ops", "fastattn.launchers", "fastattn.kernels"),
    "distributed": ("fastattn.backends.", "fastattn.ops", "fastattn.launchers", "fastattn.kernels",
                    "fastattn.reference"),
    "backends": ("fastattn.launchers", "fastattn.kernels", "fastattn.api", "fastattn.distributed", "fastattn.models"),
    "ops": ("fastattn.backends", "fastattn.api", "fastattn.distributed", "fastattn.models"),
    "launchers": ("fastattn.ops", "fastattn.backends", "fastattn.api", "fastattn.distributed", "fastattn.models"),
}


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, absolute (`from fastattn import x` counts as fastattn.x)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / package).glob("*.py")):
        for name in imported_modules(path):
            for prefix in FORBIDDEN[package]:
                # "fastattn.backends." forbids the backend modules, not the package's classes (AttentionCall)
                hit = name.startswith(prefix if prefix.endswith(".") else prefix + ".") or name == prefix
                if hit and not (prefix == "fastattn.backends." and name.removeprefix(prefix)[:1].isupper()):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_down(package):
    assert violations(package) == []


def test_the_rule_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check above can fail: a file that imports past its layer is reported."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("from fastattn import reference\nimport fastattn.ops.autograd\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations("models") == ["models/bad.py imports fastattn.reference",
                                    "models/bad.py imports fastattn.ops.autograd"]


def positional_flags(kernel_dir: Path) -> list[str]:
    """Calls between the Triton jit functions of kernel_dir that pass a constexpr parameter, or a bare
    True/False, by position (kernels/ passes every flag by keyword: a reordered parameter list then
    fails to compile instead of silently swapping two flags)."""
    trees = {f: ast.parse(f.read_text()) for f in sorted(kernel_dir.glob("*.py"))}
    params = {}  # jit function -> its parameters' annotations
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                params[node.name] = [ast.unparse(a.annotation) if a.annotation else "" for a in node.args.args]
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in params:
                annotations = params[node.func.id]
                for i, arg in enumerate(node.args):
                    if isinstance(arg, ast.Starred):
                        break
                    if (i < len(annotations) and "constexpr" in annotations[i]) or \
                            (isinstance(arg, ast.Constant) and isinstance(arg.value, bool)):
                        found.append(f"{path.name}:{node.lineno} {node.func.id} argument {i}")
    return found


def test_kernel_call_sites_pass_flags_by_keyword(tmp_path):
    assert positional_flags(ROOT / "kernels") == []
    (tmp_path / "k.py").write_text("import triton\n\n@triton.jit\ndef f(x, FLAG: tl.constexpr):\n    return x\n\n"
                                   "@triton.jit\ndef g(x):\n    return f(x, True) + f(x, FLAG=True)\n")
    assert positional_flags(tmp_path) == ["k.py:9 f argument 1"]  # the check can fail
