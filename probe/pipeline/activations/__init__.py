"""``probe activations``: the stage's config schema and its function."""
