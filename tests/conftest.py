import os

import pytest

# keep matplotlib headless and quiet in every test
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty, private torch hub cache (``$TORCH_HOME``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home" / "hub" / "checkpoints"
