#!/bin/bash
# Follow-up to long.sh (issue 12): four times run.sh's training (4,000 steps of 4 images). Does the converged
# C-RBP T = 20 head keep closing the gap to conv4 (7.1 PQ_th at 1,000 steps, 4.9 at 2,000)? Seed 0.
# ./long4k.sh; logs are <head>-T<T>-4k.log
cd "$(dirname "$0")"
common="--channels 64 --width 32 --centred --iters 4000 --batch-size 4 --eval-images 128 --eval-every 1000 --eval-steps 40 --device cpu --seed 0"
OMP_NUM_THREADS=2 python ../../train_panoptic.py --head conv4 $common --out runs/conv4-bptt-T1-4k > conv4-bptt-T1-4k.log 2>&1
OMP_NUM_THREADS=2 python ../../train_panoptic.py --head hgru --algo c-rbp --steps 20 $common \
  --out runs/hgru-c-rbp-T20-4k > hgru-c-rbp-T20-4k.log 2>&1
