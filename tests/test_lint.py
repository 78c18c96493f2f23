import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependencies_point_one_way():
    """tasks and finetune never import flows (DESIGN.md)."""
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("tasks", "finetune")
        for path in (ROOT / package).rglob("*.py")
        if any(line.lstrip().startswith(("from flows", "import flows")) for line in path.read_text().splitlines())
    ]
    assert offenders == []
