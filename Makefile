PYTHON ?= python3
# The torch that `make deps` installs when none is there: 2.13.0 is the CPU build these machines keep
# locally. On a GPU box, install the CUDA build of your choice first; deps then installs nothing.
TORCH ?= torch==2.13.0

.PHONY: test deps

test: deps
	$(PYTHON) -m pytest -q

deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install pytest
