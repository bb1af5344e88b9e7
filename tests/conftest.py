import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

# The 80 COCO category ids in label order (the original's postprocessor reports these).
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def load_fixture(name):
    """A parity fixture of the original implementation (see ../shared/parity/README.md)."""
    return torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)


def load_schema(name):
    return json.loads((FIXTURES / "schemas" / f"{name}.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
