"""``probe synthesis``: the stage's config schema and its function."""
