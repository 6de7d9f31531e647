"""Makes the repository root importable (common/, the paper scripts) and defines the opt-in test marks."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("tests.fixtures")    # its shared checks explain their failures as tests' do


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long tests, run with --slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU, skipped without one")


def pytest_collection_modifyitems(config, items):
    import torch
    for item in items:
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --slow"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Tests keep the video-probe cache to themselves instead of the user's ~/.cache/vidiff."""
    monkeypatch.setenv("VIDIFF_CACHE", str(tmp_path / "cache"))
