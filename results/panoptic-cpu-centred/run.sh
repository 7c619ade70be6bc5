#!/bin/bash
# CPU pilot of the --centred panoptic task (issue 12): does T > 1 help an hGRU head where the instance must be
# traced out from the box centre? 64 channels (paper 256), backbone width 32, 1,000 steps of 4 images.
# ./run.sh SEED (default 0); seed 0's logs are <head>-<algo>-T<T>.log, other seeds' add -s<SEED>.
cd "$(dirname "$0")"
seed=${1:-0}; tag=$([ "$seed" = 0 ] || echo "-s$seed")
common="--channels 64 --width 32 --centred --iters 1000 --batch-size 4 --eval-images 128 --eval-every 250 --eval-steps 20 --device cpu --seed $seed"
for cfg in "conv4 bptt 1" "hgru bptt 1" "hgru bptt 5" "hgru c-rbp 5"; do
  set -- $cfg
  OMP_NUM_THREADS=2 python ../../train_panoptic.py --head $1 --algo $2 --steps $3 $common \
    --out runs/$1-$2-T$3$tag > $1-$2-T$3$tag.log 2>&1
done
