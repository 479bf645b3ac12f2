import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    # Configs are referenced as configs/*.yaml, as a user would from a checkout.
    monkeypatch.chdir(ROOT)
    os.environ.setdefault("PYTHONHASHSEED", "0")
