import os
import tempfile
import warnings

import pytest

# Profiles measured by the tests go to a throwaway cache, not the user's home.
os.environ["COLLIE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="collie-compile-test-")

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Models come from presets and local configs only.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
