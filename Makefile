# Two commands on a fresh machine:
#   make demo   set up, then prepare the built-in data, pre-train the tiny backbone, train + evaluate the tiny
#               Faster R-CNN and RetinaNet
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test

$(BIN)/libra: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/libra

demo: setup
	$(BIN)/libra prepare --out data/synthetic
	$(BIN)/libra pretrain --params params.yaml --out data/pretrained/tiny_backbone.pt
	$(BIN)/libra train --config configs/faster_rcnn_tiny.yaml --out runs/demo/faster_rcnn --resume
	$(BIN)/libra evaluate --run runs/demo/faster_rcnn
	$(BIN)/libra train --config configs/retinanet_tiny.yaml --out runs/demo/retinanet --resume
	$(BIN)/libra evaluate --run runs/demo/retinanet

test: setup
	$(BIN)/python -m pytest -q
