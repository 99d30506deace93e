import os
import tempfile

import pytest

# keep matplotlib headless and quiet in every test
os.environ.setdefault("MPLBACKEND", "Agg")
# the compiled statistics kernel checks every index in tests (an out-of-bounds write is an
# IndexError here, not silent corruption); numba's cache does not tell checked code from
# unchecked, so the checked build goes to a cache of its own, shared by the test subprocesses
os.environ.setdefault("NUMBA_BOUNDSCHECK", "1")
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"probe-tests-numba-{os.getuid()}"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty, private torch hub cache (``$TORCH_HOME``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


TINY_TRAIN = ["model=tiny_cnn", "data.image_size=16", "train.epochs=1", "progress=false"]
CHEAP = {
    "activations": ["data.limit=120"],
    "saliency": ["data.probe_per_class=1", "saliency.ig_steps=4", "saliency.smoothgrad_samples=2", "saliency.auc_steps=4"],
    "concepts": ["data.limit=120", "concepts.k=4", "concepts.n_designs=8", "concepts.max_samples=3000"],
    "synthesize": ["synthesis.steps=4", "synthesis.class_images.steps=4", "synthesis.dream.steps=2",
                   "synthesis.dream.zoom_frames=2", "synthesis.dream.zoom_steps=2"],
    "geometry": ["data.probe_per_class=1", "geometry.erf.noise_images=2"],
}


def make_run(run_dir, *train_overrides, stages=tuple(CHEAP)):
    """Train a tiny model into ``run_dir`` and run the given analysis stages on it, cheaply."""
    from probe.pipeline.cli import main

    assert main(["train", *TINY_TRAIN, *train_overrides, f"run_dir={run_dir}"]) == 0
    for stage in stages:
        assert main([stage, f"run={run_dir}", *CHEAP[stage]]) == 0, stage
    return run_dir


@pytest.fixture(scope="session")
def complete_runs(tmp_path_factory):
    """Two tiny runs (different seeds) with every stage's artefacts."""
    root = tmp_path_factory.mktemp("complete")
    return [make_run(root / "tiny_a", "seed=0"), make_run(root / "tiny_b", "seed=1")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny_cnn trained one epoch, one per test module (the stages under test write into it)."""
    from probe.pipeline.cli import main

    d = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=1", f"run_dir={d}",
                 "progress=false", f"hydra.run.dir={d}/logs"]) == 0
    return d
