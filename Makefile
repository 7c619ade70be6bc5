PYTHON ?= python3
# The torch that `make deps` installs when none is there: 2.13.0 is the CPU build these machines keep
# locally. On a GPU box, install the CUDA build of your choice first; deps then installs nothing.
TORCH ?= torch==2.13.0

.PHONY: test test-fast deps pathfinder bench clean

# Every test, the slow ones (overfitting, the full model x task dry-run matrix) included.
test: deps
	$(PYTHON) -m pytest -q

# The quick subset: one dry run per task, no overfitting.
test-fast: deps
	$(PYTHON) -m pytest -q -m "not slow"

# The paper's C-RBP hGRU on Pathfinder-14 (one GPU; a small CPU configuration without one).
pathfinder:
	$(PYTHON) train.py --preset pathfinder

# Start afresh: remove the preset run directories (other runs stay) and Python's caches.
clean:
	rm -rf runs/pathfinder-14 runs/pathfinder-cpu __pycache__ .pytest_cache

# Training throughput of every algorithm on one GPU, plain and fast paths.
bench:
	$(PYTHON) bench.py && $(PYTHON) bench.py --fast

deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install pytest
