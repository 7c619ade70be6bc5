#!/bin/bash
# small-scale adaptive-steps check (issue 14): LocRNN on 5x5 mazes in a 24-px canvas, then --halt on grids 3..9
set -x
cd "$(dirname "$0")"
common="--task mazes --grid 5 --canvas 24 --model locrnn --channels 16 --batch-size 32 --images 8000 --eval-every 4000 --eval-images 256 --seed 0"
python ../../../train.py $common --algo c-rbp --steps 30 --out runs/crbp30 > crbp30.log 2>&1
python ../../../train.py $common --algo bptt --steps 15 --out runs/bptt15 > bptt15.log 2>&1
for r in crbp30 bptt15; do for g in 3 5 7 9; do
  python ../../../train.py --eval runs/$r --grid $g --steps 90 --halt 1e-3 --eval-images 256 > eval_${r}_g$g.log 2>&1
done; done
for tol in 0.03 0.01; do for g in 3 5 7 9; do
  python ../../../train.py --eval runs/crbp30 --grid $g --steps 90 --halt $tol --eval-images 256 | grep "each image halted"
done; done
