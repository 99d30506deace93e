"""``python -m probe <stage> [overrides]``: the same as the ``probe`` command."""

from probe.pipeline.cli import entry

if __name__ == "__main__":
    entry()
