"""Architecture blocks may repeat across paper files (each paper is one self-contained file) but must not drift: a
class or function under `# Copied from FILE::NAME` must be NAME from FILE, word for word but for its own name."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^# Copied from (\S+\.py)::(\w+)\s*$")


def definitions(path: Path) -> dict:
    """{name: ast node} of the top-level classes and functions of a file (ast drops comments)."""
    tree = ast.parse(path.read_text())
    return {node.name: node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}


def drifted(root: Path) -> list:
    """Every marked copy under `root` that differs from its source, as 'file::name differs from source::name'."""
    problems = []
    for path in sorted(root.glob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = MARK.match(line)
            if not match:
                continue
            source_file, source_name = match.groups()
            copy_name = re.match(r"(?:class|def) (\w+)", lines[i + 1]).group(1)
            source = definitions(root / source_file).get(source_name)
            if source is None:
                problems.append(f"{path.name}::{copy_name} names {source_file}::{source_name}, which does not exist")
                continue
            expected = re.sub(rf"\b{source_name}\b", copy_name, ast.unparse(source))
            if ast.unparse(definitions(path)[copy_name]) != expected:
                problems.append(f"{path.name}::{copy_name} differs from {source_file}::{source_name}")
    return problems


def test_no_marked_copy_has_drifted_from_its_source():
    assert drifted(ROOT) == []


def test_a_drifted_copy_is_reported(tmp_path):
    (tmp_path / "a.py").write_text("class Block:\n    def forward(self, x):\n        return x * 2\n")
    (tmp_path / "b.py").write_text("# Copied from a.py::Block\nclass Layer:\n    def forward(self, x):\n"
                                   "        return x * 2  # comments may differ\n")
    assert drifted(tmp_path) == []
    (tmp_path / "b.py").write_text("# Copied from a.py::Block\nclass Layer:\n    def forward(self, x):\n"
                                   "        return x * 3\n")
    assert drifted(tmp_path) == ["b.py::Layer differs from a.py::Block"]


def test_a_copy_of_nothing_is_reported(tmp_path):
    (tmp_path / "a.py").write_text("class Block:\n    pass\n")
    (tmp_path / "b.py").write_text("# Copied from a.py::Missing\nclass Layer:\n    pass\n")
    assert drifted(tmp_path) == ["b.py::Layer names a.py::Missing, which does not exist"]
