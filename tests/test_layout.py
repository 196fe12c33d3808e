"""The tree keeps its architecture: each layer imports only from the layers below it, no
source file outside tests/ grows past 700 lines, and perf/ is not part of the package."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 700

# transport -> kernels -> collectives -> backend/hooks -> methods -> train/perf
LAYERS = [
    ("transport", ["transports"], ["commrt.transports"]),
    ("kernels", ["kernels"], ["commrt.kernels"]),
    ("collectives", ["commrt/collectives"], ["commrt.collectives"]),
    ("backend/hooks", ["commrt/backend", "commrt/hooks.py"], ["commrt.backend", "commrt.hooks"]),
    ("methods", ["commrt/optim"], ["commrt.optim"]),
    ("train/perf", ["commrt/train.py", "commrt/training", "perf"],
     ["commrt.train", "commrt.training", "perf"]),
]
# Leaf modules (the model and the data) serve the top layer and the tests; they import no
# other part of commrt.
LEAVES = ["commrt.model", "commrt.data"]


def _layer_of_module(name: str) -> int | None:
    for index, (_, _, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    if name in LEAVES:
        return -1
    return None


def _package_of(path: Path) -> str:
    """The dotted package a source file's relative imports resolve against."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[:-1])
    if parts and parts[0] in ("kernels", "transports"):   # installed as commrt.<name>
        parts = ["commrt", *parts]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = _package_of(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from commrt import transports` imports the module commrt.transports
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
            found.append((node.lineno, module))
    return found


def _sources(entries: list[str]) -> list[Path]:
    files = []
    for entry in entries:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


@pytest.mark.parametrize("layer", range(len(LAYERS)), ids=[name for name, _, _ in LAYERS])
def test_layer_imports_only_from_below(layer):
    name, entries, _ = LAYERS[layer]
    wrong = []
    for path in _sources(entries):
        for lineno, module in _imports(path):
            target = _layer_of_module(module)
            if target is not None and target > layer:
                wrong.append(f"{path.relative_to(ROOT)}:{lineno} imports {module} "
                             f"({LAYERS[target][0]})")
    assert not wrong, f"layer {name} imports from above it:\n" + "\n".join(wrong)


def test_leaf_modules_import_no_other_part_of_commrt():
    wrong = [f"{p.relative_to(ROOT)}:{lineno} imports {module}"
             for p in (ROOT / "commrt" / "model.py", ROOT / "commrt" / "data.py")
             for lineno, module in _imports(p) if _layer_of_module(module) is not None
             and module not in LEAVES]
    assert not wrong, "\n".join(wrong)


def test_no_source_file_over_700_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    if not tracked:   # not a git checkout (an unpacked sdist): every file on disk
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")]
    long = {f: n for f in tracked if not f.startswith("tests/")
            and (n := len((ROOT / f).read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_perf_is_not_part_of_the_package():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("commrt.perf")
    assert "commrt.perf" not in sys.modules
