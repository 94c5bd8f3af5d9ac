"""Layering rules from docs/design.md, checked in a fresh interpreter."""

import subprocess
import sys
import textwrap


def test_loading_a_task_never_imports_the_trainer_torchvision_or_sklearn(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import torch
        from torch import nn
        import maskpack
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
        net(torch.zeros(1, 3, 5, 5))
        masks = {{"0.weight": torch.rand(4, 3, 3, 3) > 0.2, "3.weight": torch.rand(2, 36) > 0.1}}
        path = {str(tmp_path / "t.mask")!r}
        maskpack.save(path, masks, net, extras={{"head.weight": torch.ones(3, 2)}})
        model = maskpack.load(path, net)
        loaded = [m for m in ("torchvision", "sklearn", "maskpack.train", "maskpack.data",
                              "maskpack.evaluate", "maskpack.compare", "maskpack.cascade.train",
                              "maskpack.cascade.fit") if m in sys.modules]
        print(",".join(loaded) or "clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean", out.stdout


# ----------------------------------------------------------------------------- static house rules

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

PKG = Path(__file__).resolve().parent.parent / "maskpack"
SOURCES = sorted(PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_sources_found():
    assert len(SOURCES) > 30 and any(p.name == "io.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_size_limits(path):
    """Modules <= 600 lines, classes <= 250, functions <= 80 (docs/design.md)."""
    text = path.read_text()
    assert len(text.splitlines()) <= 600, f"{path.name} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            n = node.end_lineno - node.lineno + 1
            assert n <= 250, f"class {node.name} in {path.name} has {n} lines"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 80, f"function {node.name} in {path.name} has {n} lines"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_import_rules(path):
    """Only io.py and the storage comparison reach the storage layer; storage needs no torch;
    the library never imports the CLI."""
    name = _module_name(path)
    imports = _imports(path)
    if not (name.startswith("maskpack.storage") or name in ("maskpack.io",)
            or name.startswith("maskpack.compare")):
        bad = sorted(i for i in imports if i == "maskpack.storage" or i.startswith("maskpack.storage."))
        assert not bad, f"{name} imports the storage layer directly ({bad}): go through maskpack.io"
    if name.startswith("maskpack.storage"):
        assert not [i for i in imports if i == "torch" or i.startswith("torch.")], f"{name} imports torch"
    if not name.startswith("maskpack.cli") and name != "maskpack.__main__":
        assert not [i for i in imports if i.startswith("maskpack.cli")], f"{name} imports the CLI"


def test_import_rules_see_a_violation(tmp_path):
    """The import checker resolves relative imports (a rule that cannot fail proves nothing)."""
    fake = PKG / "train" / "config.py"
    assert "maskpack.bn" in _imports(fake) and "maskpack.errors.ConfigError" in _imports(fake)
    assert "maskpack.storage.codecs" in _imports(PKG / "io.py")
