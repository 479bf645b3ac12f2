"""The package's layer rules (.importlinter) hold, and they do catch a breach."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "semanticist_fast"


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    # The console script of import-linter, run with this interpreter.
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_import_contracts_hold():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_model_importing_the_trainer_breaks_the_contracts(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "semanticist_fast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    layers = tmp_path / "semanticist_fast" / "models" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom ..engine import trainer  # a breach\n")
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "semanticist_fast.models.layers -> semanticist_fast.engine.trainer" in result.stdout


def test_at_most_four_loose_modules_at_the_package_root():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= 4, loose
