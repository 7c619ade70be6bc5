#!/bin/bash
# Follow-up to sweep.sh (issue 12): does the converged C-RBP T = 20 head catch up with conv4 given twice the
# training (2,000 steps of 4 images)? Seed 0, run.sh's recipe otherwise. ./long.sh; logs are <head>-T<T>-2k.log
cd "$(dirname "$0")"
common="--channels 64 --width 32 --centred --iters 2000 --batch-size 4 --eval-images 128 --eval-every 500 --eval-steps 40 --device cpu --seed 0"
OMP_NUM_THREADS=2 python ../../train_panoptic.py --head conv4 $common --out runs/conv4-bptt-T1-2k > conv4-bptt-T1-2k.log 2>&1
OMP_NUM_THREADS=2 python ../../train_panoptic.py --head hgru --algo c-rbp --steps 20 $common \
  --out runs/hgru-c-rbp-T20-2k > hgru-c-rbp-T20-2k.log 2>&1
