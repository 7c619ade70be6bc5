PYTHON ?= python3
# The torch that `make deps` installs when none is there: 2.13.0 is the CPU build these machines keep
# locally. On a GPU box, install the CUDA build of your choice first; deps then installs nothing.
TORCH ?= torch==2.13.0

.PHONY: test test-fast deps pathfinder reproduce extrapolate bench panoptic clean

# Every test, the slow ones (overfitting, the full model x task dry-run matrix) included.
test: deps
	$(PYTHON) -m pytest -q

# The quick subset: one dry run per task, no overfitting.
test-fast: deps
	$(PYTHON) -m pytest -q -m "not slow"

# The paper's C-RBP hGRU on Pathfinder-14 (one GPU; a small CPU configuration without one).
pathfinder:
	$(PYTHON) train.py --preset pathfinder

# Train each named preset run (options.py) into results/<run> for MINUTES more, resuming where the last call
# stopped; finished runs are skipped. $(2): options for the resumed pieces.
MINUTES ?= 20
define train-pieces
	for r in $(1); do \
	  if [ -f results/$$r/model.pt ]; then echo "results/$$r is finished"; \
	  elif [ -f results/$$r/checkpoint.pt ]; then \
	    $(PYTHON) train.py --resume results/$$r --until-minutes $(MINUTES) $(2); \
	  else $(PYTHON) train.py --preset $$r --until-minutes $(MINUTES); fi || exit 1; done
endef

# The C-RBP paper's PF-14 rows (C-RBP T=20, BPTT T=6, C-BPTT T=6, then RBP T=20 and the FF6 CNN; one GPU).
# The final report: 10,000 held-out images, and the PF-14 model also on PF-20 and PF-25 (runs started before the
# presets said so get it on resume).
reproduce:
	$(call train-pieces,pf14-crbp pf14-bptt pf14-cbptt pf14-rbp pf14-ff6,--eval-images 10000 --eval-lengths 20 25)

# The LocRNN paper's runs (one GPU): LocRNN, ConvGRU, R-ResNet-36, ResNet-36 on medium mazes, tested on small,
# medium and large at t = 1..3T; LocRNN with the LCP (c-bptt, and c-rbp at T = 30); LocRNN on PF-14 cls, tested
# on PF-9 and PF-18.
extrapolate:
	$(call train-pieces,mazes-locrnn mazes-convgru mazes-rresnet mazes-resnet mazes-locrnn-cbptt \
	  mazes-locrnn-crbp30 pfcls-locrnn,)

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
