import os
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist

# Profiles measured by the tests are kept beside pytest's own cache, not in the user's
# home: entries are keyed by the code that measured them, so a change to it measures again.
os.environ["COLLIE_COMPILE_CACHE"] = str(Path(__file__).resolve().parent.parent
                                         / ".pytest_cache" / "collie-compile")

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Models come from presets and local configs only.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory):
    """A gloo group of one process, as `collie-compile train` without torchrun makes."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/pg",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()
