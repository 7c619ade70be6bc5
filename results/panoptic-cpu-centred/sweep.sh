#!/bin/bash
# Follow-up to run.sh (issue 12): why does the C-RBP head's PQ fall after T? Seed 0 and run.sh's recipe, with a
# longer T (is h_5 just not at the fixed point yet?) and a larger LCP weight xi (is the contraction too weak?).
# ./sweep.sh; logs are hgru-c-rbp-T<T>[-xi<XI>].log (xi 0.001, the panoptic code's, has no suffix)
cd "$(dirname "$0")"
common="--channels 64 --width 32 --centred --iters 1000 --batch-size 4 --eval-images 128 --eval-every 250 --eval-steps 20 --device cpu --seed 0"
for cfg in "10 0.001" "5 0.1" "20 0.001" "20 0.1" "5 0.01"; do
  set -- $cfg; tag=T$1$([ "$2" = 0.001 ] || echo "-xi$2")
  OMP_NUM_THREADS=2 python ../../train_panoptic.py --head hgru --algo c-rbp --steps $1 --xi $2 $common \
    --out runs/hgru-c-rbp-$tag > hgru-c-rbp-$tag.log 2>&1
done
