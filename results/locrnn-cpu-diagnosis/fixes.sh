#!/bin/bash
cd "$(dirname "$0")"
T() { /usr/bin/time -f "$1 %e s" -a -o runs/times.txt "${@:2}"; }
T crbp_pw1000 ./run.sh crbp_pw1000 c-rbp --penalty-weight 1000
T crbp_mu0.5 ./run.sh crbp_mu0.5 c-rbp --mu 0.5
T crbp_K30 ./run.sh crbp_K30 c-rbp --neumann-steps 30
T crbp_T30 ./run.sh crbp_T30 c-rbp --steps 30
export OMP_NUM_THREADS=1
T crbp_randlcp python train_randlcp.py --task mazes --grid 5 --canvas 16 --model locrnn --channels 16 --batch-size 32 \
  --images 8000 --eval-every 2000 --eval-images 256 --algo c-rbp --seed 0 --out runs/crbp_randlcp > runs/crbp_randlcp.log 2>&1
