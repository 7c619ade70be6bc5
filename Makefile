PYTHON ?= python3
# The torch that `make deps` installs when none is there: 2.13.0 is the CPU build these machines keep
# locally. On a GPU box, install the CUDA build of your choice first; deps then installs nothing.
TORCH ?= torch==2.13.0

.PHONY: test test-fast deps pathfinder reproduce bench panoptic clean

# Every test, the slow ones (overfitting, the full model x task dry-run matrix) included.
test: deps
	$(PYTHON) -m pytest -q

# The quick subset: one dry run per task, no overfitting.
test-fast: deps
	$(PYTHON) -m pytest -q -m "not slow"

# The paper's C-RBP hGRU on Pathfinder-14 (one GPU; a small CPU configuration without one).
pathfinder:
	$(PYTHON) train.py --preset pathfinder

# The paper's PF-14 rows (C-RBP T=20, BPTT T=6, C-BPTT T=6; one GPU) into results/, in pieces: each call trains
# every unfinished run for MINUTES more and resumes where the last call stopped. The final report: 10,000 held-out
# images, and the PF-14 model also on PF-20 and PF-25 (runs started before the presets said so get it on resume).
MINUTES ?= 20
reproduce:
	for r in pf14-crbp pf14-bptt pf14-cbptt; do \
	  if [ -f results/$$r/model.pt ]; then echo "results/$$r is finished"; \
	  elif [ -f results/$$r/checkpoint.pt ]; then $(PYTHON) train.py --resume results/$$r --until-minutes $(MINUTES) \
	    --eval-images 10000 --eval-lengths 20 25; \
	  else $(PYTHON) train.py --preset $$r --until-minutes $(MINUTES); fi || exit 1; done

# Start afresh: remove the preset run directories (other runs stay) and Python's caches.
clean:
	rm -rf runs/pathfinder-14 runs/pathfinder-cpu __pycache__ .pytest_cache

# Training throughput of every algorithm on one GPU, plain and fast paths side by side (writes results/).
bench:
	$(PYTHON) bench.py

# The recurrent mask head (one GPU): its memory against T, then conv4 / BPTT 1,3,5 / C-RBP 5,10,20 x 3 seeds.
# Re-running resumes where it stopped.
panoptic:
	$(PYTHON) train_panoptic.py --memory --out runs/panoptic && \
		$(PYTHON) train_panoptic.py --experiment --out runs/panoptic

deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install pytest
