# Two commands on a fresh machine:
#   make demo   set up, then prepare the built-in data, pre-train the tiny backbone, train + evaluate the tiny
#               Faster R-CNN and RetinaNet
#   make test   set up, then run the test suite (make test-slow: the slow tests beyond it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-slow test-all

# pip's and the build backend's output go to $(VENV)/install.log, printed only if the install fails
$(BIN)/libra: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@{ $(BIN)/pip install --quiet --upgrade pip && $(BIN)/pip install --quiet -e '.[test]'; } \
		> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
	touch $@

# the page `dvc plots show` writes, with Vega inlined (pipeline/report/offline_page.py): it renders offline
.dvc/plots/offline.html: $(BIN)/libra
	$(BIN)/python -m pipeline.report.offline_page $@

setup: $(BIN)/libra .dvc/plots/offline.html

demo: setup
	$(BIN)/libra prepare --out data/synthetic
	$(BIN)/libra pretrain --params params.yaml --out data/pretrained/tiny_backbone.pt
	$(BIN)/libra train --config configs/faster_rcnn_tiny.yaml --out runs/demo/faster_rcnn --resume
	$(BIN)/libra evaluate --run runs/demo/faster_rcnn
	$(BIN)/libra train --config configs/retinanet_tiny.yaml --out runs/demo/retinanet --resume
	$(BIN)/libra evaluate --run runs/demo/retinanet

# the default suite (within 15 minutes on a 2-core machine); test-slow: the tests marked slow; test-all: both
test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"
