"""``probe concepts``: the stage's config schema and its function (CRAFT concepts of one layer)."""
