import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py for the spawned workers


def pytest_configure(config: pytest.Config) -> None:
    """The command's filters of known-harmless third-party warnings (gatedpo_mega/environment.py), as pytest's own:
    pytest resets the warning filters around each test."""
    from gatedpo_mega.environment import CPU_ONLY_WARNINGS, KNOWN_WARNINGS

    known = KNOWN_WARNINGS + ([] if torch.cuda.is_available() else CPU_ONLY_WARNINGS)
    for message, category, module, _why in known:
        # pytest's "action:message:category:module" form; a ":" in a message regex would end its field
        config.addinivalue_line(
            "filterwarnings", f"ignore:{message.replace(':', '.')}:{category.__name__}:{module}"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, with the reason, where torch sees no CUDA device: the one place that decides."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
