#!/bin/bash
# usage: run.sh NAME SCRIPT [extra args]   SCRIPT = train (repo train.py) or lcp (train_lcp.py)
export OMP_NUM_THREADS=1
name=$1; script=$2; shift 2
cd "$(dirname "$0")" && mkdir -p runs
[ "$script" = train ] && py=../../../train.py || py=train_lcp.py
start=$(date +%s.%N)
python $py --task mazes --grid 5 --canvas 16 --model locrnn --channels 16 --batch-size 32 \
  --images ${IMAGES:-8000} --eval-every 2000 --eval-images 256 --algo c-rbp --seed 0 --out runs/$name "$@" > runs/$name.log 2>&1
echo "rc $? wall $(python -c "print(round($(date +%s.%N)-$start,1))")" | tee runs/$name.wall
