"""``probe saliency``: the stage's config schema and its function."""
