"""Does teacher-made data help? The `synth` stage's experiment on an existing `danlu run` folder.

    python benchmarks/synth_experiment.py --run runs/tiny --out /tmp/synth_tiny synth.n=200 synth.answers=1000
    python benchmarks/synth_experiment.py --run runs/tiny --out /tmp/synth_tiny synth.split=test   # publish

`--run` is a finished run with `world/`, `pretrain/` (the students' base) and `sft/` (the teacher, unless
synth.teacher names another checkpoint or URL). The settings are the synth recipe's `synth:` section with the given
overrides; the students' SFT section is the run's own (its recipe.json) with synth.steps steps. Everything is
danlu.synth.experiment's: the teacher served by `danlu serve` on a free loopback port, Self-Instruct rows and
distillation answers through the OpenAI API, students on hand-written vs hand-written + each synthetic set, and
the held-out deltas paired item by item with their 95% intervals, in OUT/results.md and results.json. Outputs
already in OUT are reused when their inputs are unchanged (a rerun after a kill continues).

Why this script beside `danlu run synth`: the recipe trains its own teacher first (the tiny pipeline, ~10 minutes
on an idle 2-core machine); with a run already on disk this skips straight to the experiment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="a finished `danlu run` folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "overrides", nargs="*", help="synth.KEY=VALUE (the synth recipe's section), e.g. synth.n=100"
    )
    a = ap.parse_args()
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.synth.experiment import SynthExperimentConfig, run_experiment

    bad = [o for o in a.overrides if not o.startswith("synth.")]
    if bad:
        raise SystemExit(f"only synth.* overrides here, got {' '.join(bad)}")
    section = apply_overrides(load_recipe("synth"), a.overrides)["synth"]
    cfg = from_dict(SynthExperimentConfig, section, "synth")
    recipe_path = a.run / "recipe.json"
    if not recipe_path.is_file():
        raise SystemExit(f"{a.run}: no recipe.json (not a `danlu run` folder)")
    recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    t0 = time.time()
    result = run_experiment(
        a.run / "world",
        cfg.teacher or str(a.run / "sft"),
        Path(cfg.student) if cfg.student else a.run / "pretrain",
        a.out,
        cfg,
        recipe,
    )
    print((a.out / "results.md").read_text(encoding="utf-8"))
    print(f"[synth_experiment] {time.time() - t0:.0f} s; {a.out / 'results.json'}")
    return 0 if result["accuracy"] else 1


if __name__ == "__main__":
    sys.exit(main())
