#!/usr/bin/env bash
# Quickstart: set up the environment, write the sklearn digits as image folders, train a small
# ViT with MaSSL on the CPU (configs/quickstart.yaml, 7 to 21 minutes on 2 cores), then compare the
# trained teacher with the same architecture at random initialisation and with the raw pixels
# on k-NN, linear probe, low-shot and retrieval (docs/eval.md).
# Extra arguments are config overrides, e.g.:  scripts/quickstart.sh optim.epochs=20
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
bin="${MASSL_VENV:-$root/.venv}/bin"  # setup_env.sh's environment
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whichever checkout the venv installed
run=runs/quickstart
# 32 px (bicubic from 8x8): random crops then vary continuously instead of by whole 8x8 pixels
[ -d data/digits/val ] || "$bin/python" -m massl.tools.digits --out data/digits --size 32
start=$(date +%s)
"$bin/massl-train" --config configs/quickstart.yaml "run.output_dir=$run" "$@"
echo "[quickstart] training took $(( $(date +%s) - start )) s"
# The four protocols of docs/eval.md, trained teacher vs the same ViT at random init; the feature
# cache makes each network's features extracted once for all four.
common=(--checkpoint "$run" --train data/digits/train --val data/digits/val --crop-ratio 1.0 --threads 2
        --cache "$run/eval/cache")
for cmd in knn linear lowshot retrieval; do
  "$bin/massl-eval" "$cmd" "${common[@]}" --out "$run/eval/$cmd-trained.json" >/dev/null
  "$bin/massl-eval" "$cmd" "${common[@]}" --random-init --out "$run/eval/$cmd-random-init.json" >/dev/null
  # the raw-pixel baseline: the 32 px images themselves, flattened, as features
  "$bin/massl-eval" "$cmd" "${common[@]}" --weights pixels --out "$run/eval/$cmd-pixels.json" >/dev/null
done
"$bin/python" - "$run" <<'PY'
import json, sys
run = sys.argv[1]
def load(cmd, weights):
    return json.load(open(f"{run}/eval/{cmd}-{weights}.json"))["results"]
def row(weights):
    knn = {r["k"]: r["top1"] for r in load("knn", weights)}
    low = {r["shots"]: r for r in load("lowshot", weights)}
    ret = load("retrieval", weights)
    return [knn[20], knn[10], load("linear", weights)["top1"],
            low[1]["logreg"]["top1_mean"], low[5]["logreg"]["top1_mean"], low[13]["logreg"]["top1_mean"],
            low[5]["ncm"]["top1_mean"], ret["mAP"], ret["recall"][0]["recall"]]
head = ["k-NN k=20", "k-NN k=10", "linear", "1-shot", "5-shot", "13-shot", "5-shot NCM", "retr. mAP", "R@1"]
print("[quickstart] digits, 500 val images, top-1 unless noted (JSON in %s/eval/):" % run)
print(f"| {'weights':<12} | " + " | ".join(head) + " |")
print(f"| {'---':<12} | " + " | ".join("---:" for _ in head) + " |")
for weights in ("trained", "random-init", "pixels"):
    print(f"| {weights:<12} | " + " | ".join(f"{v:.3f}".rjust(len(h)) for v, h in zip(row(weights), head)) + " |")
PY
# The run's report (docs/report.md): curves, the table above, the teacher's attention maps.
report=$("$bin/massl-report" "$run" --images data/digits/val --crop-ratio 1.0 --threads 2)
echo "[quickstart] report: $report (open it in a browser)"
