"""Test helpers shared across the test packages (fixtures are in the conftest.py files)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
