#!/usr/bin/env bash
# The whole bridgevla pipeline on the tiny CPU default (about 50 minutes on 2 cores). Each step
# writes under data/ or out/ and is skipped when its output exists; OVERWRITE=1 redoes all.
set -euo pipefail
cd "$(dirname "$0")"
OW=${OVERWRITE:+--overwrite}
have() { [ -e "$1" ] && [ -z "$OW" ]; }
run() { local t=$SECONDS; "$@"; echo "[pipeline] $* : $((SECONDS - t)) s"; }

# 1. Source domain: demonstrations of 4 tasks in the default scene, and their ETC records.
have data/source || run python data.py collect --out data/source $OW
have data/source/etc.jsonl || run python etc.py --data data/source

# 2. Target domain: the same tasks on a white table, 5 demonstrations each, and their ETC.
have data/target || run python data.py collect --out data/target --episodes 5 --variation.table-color white $OW
have data/target/etc.jsonl || run python etc.py --data data/target

# 3. Task-relevant OOD scenes for ETC only: yellow objects, held-out paraphrases, no actions.
have data/ood || run python data.py collect --out data/ood --episodes 10 --variation.table-color white \
    --variation.object-color yellow --no-actions $OW
have data/ood/etc.jsonl || run python etc.py --data data/ood --paraphrases heldout

# 4. The three stages: Distribution Bridging, Objective Bridging, Retentive Adaptation.
#    Stages 2 and 3 end with closed-loop success over 20 fresh layouts per task.
have out/stage1 || run python train_etc.py $OW
have out/stage2 || run python train_vla.py --stage 2 $OW
have out/stage3 || run python train_vla.py --stage 3 $OW

# 4b. The retention baseline: stage 2 with actions only (no ETC co-training), from the same stage 1.
have out/stage2_action_only || run python train_vla.py --stage 2 --etc-start 0 --etc-end 0 \
    --out out/stage2_action_only --eval-episodes 0 $OW

# 5. One-step students of the stage-3 teacher: SDM (dual teacher) and the CD baseline.
have out/sdm || run python distill_sdm.py $OW
have out/cd || run python distill_sdm.py --method cd $OW

# 6. Evaluation, every policy on the same tasks, seeds and layouts (3 seeds x 10 per task).
#    The stage-3 teacher also at 1 step: what one step gives without distillation.
E="python eval.py success"
have out/eval/stage2.json || run $E --ckpt out/stage2 --data data/source --name stage2
have out/eval/stage2_action_only.json || run $E --ckpt out/stage2_action_only --data data/source --name stage2_action_only
have out/eval/stage3.json || run $E --ckpt out/stage3 --name stage3
have out/eval/stage3_ood.json || run $E --ckpt out/stage3 --object-colors yellow --paraphrases heldout --name stage3_ood
have out/eval/stage3_1step.json || run $E --ckpt out/stage3 --steps 1 --name stage3_1step
have out/eval/sdm.json || run $E --ckpt out/sdm --name sdm
have out/eval/cd.json || run $E --ckpt out/cd --name cd
for s in stage1 stage2 stage2_action_only stage3; do
  have out/eval/etc_$s.json || run python eval.py etc --ckpt out/$s
done
have out/eval/cka_stage1_stage2.json || run python eval.py cka --a out/stage1 --b out/stage2
have out/eval/cka_stage1_stage2_action_only.json || run python eval.py cka --a out/stage1 --b out/stage2_action_only
have out/eval/cka_stage1_stage3.json || run python eval.py cka --a out/stage1 --b out/stage3
have out/bench.md || run python bench.py

# 7. The results tables (the README's results section is this, via --readme README.md).
python eval.py report
