#!/usr/bin/env bash
# The pipeline with train.device=cuda, in a throwaway copy of this checkout (nothing here changes).
# Usage: bash tools/studies/cuda_check.sh [STAGE] [KEY=VALUE ...]
#   STAGE: dvc stage to reproduce up to (default: evaluate); KEY=VALUE: params overrides, e.g.
#   data.root=/abs/path/rice-image teachers.epochs=14. Prints each training stage's wall time, throughput
#   and val accuracy; the dvc repro log goes to $LOG (default /tmp/cuda_check.log), and the run's
#   metrics/*.json to $METRICS_DIR when it is set (also after a failed stage: what ran is kept).
# Needs a CUDA torch and the packages of requirements.txt. Report of a run: reports/cuda_check.md.
set -euo pipefail
target=${1:-evaluate}; shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
log=${LOG:-/tmp/cuda_check.log}
finish() {
  if [ -n "${METRICS_DIR:-}" ]; then mkdir -p "$METRICS_DIR"; cp "$work"/metrics/*.json "$METRICS_DIR" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap finish EXIT
git -C "$repo" ls-files -co --exclude-standard -z | (cd "$repo" && xargs -0 cp --parents -t "$work")
cd "$work"
export GIT_AUTHOR_NAME=cuda-check GIT_AUTHOR_EMAIL=cuda-check@localhost
export GIT_COMMITTER_NAME=cuda-check GIT_COMMITTER_EMAIL=cuda-check@localhost
git init -q && git add -A && git commit -qm "cuda check"
python3 -m tools.make_demo_data --out data/rice-demo
python3 - "$@" <<'PY'
import sys, yaml
params = yaml.safe_load(open("params.yaml"))
params["train"]["device"] = "cuda"
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    params[section][name] = yaml.safe_load(value)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
rm -f metrics/*.json  # outputs of the stages below: only what this run measures is printed
start=$(date +%s)
python3 -m dvc repro "$target" >"$log" 2>&1 || { tail -20 "$log"; exit 1; }
echo "dvc repro $target: $(( $(date +%s) - start )) s (log: $log)"
python3 - <<'PY'
import json
from pathlib import Path
for path in sorted(Path("metrics").glob("*.json")):
    metrics = json.loads(path.read_text())
    if "wall_s" in metrics:
        speed = metrics.get("train_images_per_s", metrics.get("images_per_s"))
        acc = metrics.get("val_acc", metrics.get("teacher_ensemble_val_acc"))
        print(f"{path.stem:24s} {metrics['wall_s']:8.1f} s {speed:8.0f} img/s  val {acc:.4f}")
PY
