#!/usr/bin/env bash
# The whole bridgevla pipeline on the tiny CPU default. Each step writes under data/ or out/;
# pass OVERWRITE=1 to redo steps whose outputs already exist.
set -euo pipefail
cd "$(dirname "$0")"
OW=${OVERWRITE:+--overwrite}

# 1. Source-domain demonstrations (default scene) and their ETC records.
[ -d data/source ] && [ -z "$OW" ] || python data.py collect --out data/source $OW
python data.py etc --data data/source

# 2. Task-relevant OOD scenes for ETC only: a novel object colour, held-out paraphrases,
#    no action labels written.
[ -d data/ood ] && [ -z "$OW" ] || python data.py collect --out data/ood --episodes 10 \
    --variation.object-color yellow --no-actions $OW
python data.py etc --data data/ood --paraphrases heldout
