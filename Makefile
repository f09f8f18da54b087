# kd-mlflow: the two commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TEACHER := pretrained/fashion_mnist-resnet20.pt
RUN_EPOCHS ?= 3

.PHONY: setup data run test test-fast mlproject ui clean

$(BIN)/kd-mlflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/kd-mlflow

# Fashion-MNIST from Debian's package when apt is available (else torchvision downloads it
# on first use into ~/.cache/kd_mlflow, or set KD_DATA_DIR).
data:
	@if [ -f $(FMNIST) ] || [ -n "$$KD_DATA_DIR" ]; then echo "Fashion-MNIST: ok"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not installed system-wide; it will be downloaded on first use"; fi

# The main job: a short KD experiment (resnet20 teacher -> resnet8 student) on Fashion-MNIST,
# logged to ./mlflow.db. Uses the committed pretrained teacher, or trains one first.
run: setup data
	@if [ ! -f $(TEACHER) ]; then $(BIN)/kd-mlflow teacher --arch resnet20 --epochs 12 --scheduler cosine --seed 0 --precision fp32; fi
	$(BIN)/kd-mlflow train kd --teacher pretrained:fashion_mnist-resnet20 --epochs $(RUN_EPOCHS) \
	  --experiment kd-mlflow-quickstart

test: setup data
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not e2e"

mlproject: setup
	$(BIN)/kd-mlflow mlproject

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlruns mlartifacts .pytest_cache
