"""Atomic writers keep the user's umask: a staged file or folder ends with the mode an ordinary one gets."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, stat, sys, json
    from pathlib import Path
    import torch
    os.umask(int(sys.argv[2], 8))
    from probe.files import write_json, write_npz
    from probe.pipeline.rundir import save_weights, staged_dir
    import numpy as np
    out = Path(sys.argv[1])
    (out / "plain").mkdir()
    (out / "plain.txt").write_text("x")
    write_json(out / "a.json", {"a": 1})
    write_npz(out / "b.npz", {"x": np.zeros(2)})
    save_weights(torch.nn.Linear(2, 2), out / "w.safetensors")
    with staged_dir(out / "stage") as tmp:
        (tmp / "inside.txt").write_text("y")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    print(json.dumps(modes))
""")


@pytest.mark.parametrize("umask", ["077", "002", "022"])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    import json

    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), umask], capture_output=True, text=True,
                         check=True)
    modes = json.loads(out.stdout)
    plain_file, plain_dir = modes.pop("plain.txt"), modes.pop("plain")
    assert plain_file == 0o666 & ~int(umask, 8) and plain_dir == 0o777 & ~int(umask, 8)  # what the OS gives
    assert modes.pop("stage") == plain_dir
    assert modes == {name: plain_file for name in ("a.json", "b.npz", "w.safetensors", "inside.txt")}
