#!/usr/bin/env bash
# The whole bridgevla pipeline on the tiny CPU default (~25 minutes on 2 cores). Each step
# writes under data/ or out/ and is skipped when its output exists; OVERWRITE=1 redoes all.
set -euo pipefail
cd "$(dirname "$0")"
OW=${OVERWRITE:+--overwrite}
have() { [ -e "$1" ] && [ -z "$OW" ]; }
run() { local t=$SECONDS; "$@"; echo "[pipeline] $* : $((SECONDS - t)) s"; }

# 1. Source domain: demonstrations of 4 tasks in the default scene, and their ETC records.
have data/source || run python data.py collect --out data/source $OW
have data/source/etc.jsonl || run python data.py etc --data data/source

# 2. Target domain: the same tasks on a white table, 5 demonstrations each, and their ETC.
have data/target || run python data.py collect --out data/target --episodes 5 --variation.table-color white $OW
have data/target/etc.jsonl || run python data.py etc --data data/target

# 3. Task-relevant OOD scenes for ETC only: yellow objects, held-out paraphrases, no actions.
have data/ood || run python data.py collect --out data/ood --episodes 10 --variation.table-color white \
    --variation.object-color yellow --no-actions $OW
have data/ood/etc.jsonl || run python data.py etc --data data/ood --paraphrases heldout

# 4. The three stages: Distribution Bridging, Objective Bridging, Retentive Adaptation.
#    Stages 2 and 3 end with closed-loop success over 20 fresh layouts per task.
have out/stage1 || run python train_etc.py $OW
have out/stage2 || run python train_vla.py --stage 2 $OW
have out/stage3 || run python train_vla.py --stage 3 $OW
