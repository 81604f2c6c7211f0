import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Models come from presets and local configs only.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
