"""probe's benchmark suite: one JSON of figures and ratios, and a table.

Runs benchmarks/bench_activations.py, bench_saliency.py and bench_synthesis.py (each ``run(quick)``,
ratios against baselines measured in the same process: a bare forward pass, a bare forward+backward,
a one-at-a-time render, Lucent when installed), plus, in a clean temporary copy of the repository
(tests/repo_copy.py, as tests/test_pipeline.py uses it; default params.yaml):

- ``e2e_repro_s``: a full ``dvc repro`` of the default pipeline (target <= 300 s on a 2-core CPU);
- ``noop_repro_s``: a second ``dvc repro`` that runs nothing (target <= 10 s).

Absolute times are labelled with the device (CPU model and core count, or the GPU). With ``--quick``
the benchmarks use their quick settings and the pipeline copy gets two tiny runs (tiny_cnn, 1 and 0
epochs): the absolute times then do not answer the targets.

    python benchmarks/run.py [--quick] [--only activations,saliency,synthesis,pipeline] [--out results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("activations", "saliency", "synthesis", "pipeline")


def device_label() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model}, {cores} cores"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))  # bench_activations re-imports itself in subprocesses
    spec.loader.exec_module(module)
    return module


def _sh(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout)[-1500:]}")
    return took, out.stdout


def pipeline(quick: bool) -> dict:
    """``dvc repro`` from a clean copy, then a no-op ``dvc repro``."""
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from repo_copy import TINY_CONCEPTS, TINY_RUNS, copy_repo

    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        dst = copy_repo(Path(tmp), **({"runs": TINY_RUNS, "concepts": TINY_CONCEPTS} if quick else {}))
        params = yaml.safe_load((dst / "params.yaml").read_text())
        e2e, out = _sh(["dvc", "repro"], dst)
        stages = out.count("Running stage")
        noop, again = _sh(["dvc", "repro"], dst)
        return {"runs": sorted(params["runs"]), "stages_run": stages, "e2e_repro_s": e2e, "noop_repro_s": noop,
                "noop_ran_nothing": "Running stage" not in again,
                "e2e_target_s": 300, "noop_target_s": 10,
                "e2e_meets_target": None if quick else e2e <= 300, "noop_meets_target": noop <= 10}


def flatten(d, prefix=""):
    rows = []
    if isinstance(d, dict):
        for k, v in d.items():
            rows += flatten(v, f"{prefix}{k}.")
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            rows += flatten(v, f"{prefix}{v.get('model', v.get('name', i))}.")
    else:
        rows.append((prefix[:-1], d))
    return rows


def table(result: dict) -> str:
    rows = flatten(result)
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="quick settings (minutes); times do not answer the targets")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", default="benchmarks/results.json", help="where the JSON goes")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--only: {', '.join(unknown)} not allowed; allowed: {', '.join(PARTS)}")

    import torch

    result = {"device": device_label(), "quick": args.quick, "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__}
    failed = []
    for part in parts:
        t = time.perf_counter()
        print(f"== {part}", file=sys.stderr, flush=True)
        try:
            result[part] = pipeline(args.quick) if part == "pipeline" else load_bench(part).run(quick=args.quick)
        except Exception as e:  # noqa: BLE001  (keep the other figures; say what failed)
            traceback.print_exc()
            result[part] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            failed.append(part)
        result[part]["wall_s"] = time.perf_counter() - t
        result[part]["load_avg_1min_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    print(table(result))
    print(f"\nwritten: {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
