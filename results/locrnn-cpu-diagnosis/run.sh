#!/bin/bash
# usage: run.sh NAME ALGO [extra args]
export OMP_NUM_THREADS=1
name=$1; algo=$2; shift 2
cd "$(dirname "$0")" && mkdir -p runs
python ../../train.py --task mazes --grid 5 --canvas 16 --model locrnn --channels 16 --batch-size 32 \
  --images ${IMAGES:-8000} --eval-every 2000 --eval-images 256 --algo $algo --seed 0 --out runs/$name "$@" > runs/$name.log 2>&1
