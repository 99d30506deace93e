"""``probe geometry``: the stage's config schema and its function."""
