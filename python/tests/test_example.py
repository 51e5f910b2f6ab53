"""The PyTorch example cannot run in CI (no torch, no model weights): check that it
parses and calls only functions the package has."""

import ast
from pathlib import Path

import tca

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "audit_hf_model.py"


def test_example_parses_and_uses_existing_api():
    tree = ast.parse(EXAMPLE.read_text(), filename=str(EXAMPLE))
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "tca"}
    assert {"bound", "calibrate", "TcaError"} <= used
    missing = sorted(a for a in used if not hasattr(tca, a))
    assert not missing, f"the example calls tca.{missing}, which the package lacks"
