# kd-mlflow: the two commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TEACHER := pretrained/fashion_mnist-resnet20.pt
RUN_EPOCHS ?= 3

.PHONY: setup data run test test-postgres test-fast mlproject ui server postgres clean benchmark benchmark-extra benchmark-summary

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

# `make test` = the whole suite, then a PostgreSQL pass: the e2e tests below again, against
# an `mlflow server` whose backend is a fresh PostgreSQL database (created and dropped by
# tests/conftest.py). It runs when KD_TEST_POSTGRES_URI names a role that may create
# databases (`sudo make postgres` prints it; CI sets it). KD_REQUIRE_POSTGRES=1 (CI) makes
# a missing or unreachable PostgreSQL a failure instead of a skip.
PG_TESTS := tests/test_e2e_core.py::test_teacher_entry_point 'tests/test_e2e_core.py::test_mode_entry_point[kd-fp32]' \
  tests/test_compare_registry.py::test_compare_statistics_exclusions_and_logged_artifacts \
  tests/test_compare_registry.py::test_champion_alias_follows_test_acc_and_pull_reproduces_it

# TEST_WORKERS: pytest-xdist processes, whole test files each (their module fixtures stay shared).
# --durations: the 25 slowest tests close every run (CI's too), so that where the suite's
# time goes is on record wherever it ran.
TEST_WORKERS ?= 2
test: setup data
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25
	@$(MAKE) --no-print-directory test-postgres

test-postgres: setup
	@if [ -n "$$KD_TEST_POSTGRES_URI" ]; then \
	  echo "PostgreSQL pass: kd e2e, compare and registry tests against mlflow server on a fresh PostgreSQL database"; \
	  KD_TEST_BACKEND=postgres $(BIN)/pytest -q -rs $(PG_TESTS); \
	elif [ "$$KD_REQUIRE_POSTGRES" = 1 ]; then \
	  echo "error: KD_REQUIRE_POSTGRES=1 but KD_TEST_POSTGRES_URI is not set; run scripts/postgres-setup.sh --env"; exit 1; \
	else \
	  echo "PostgreSQL pass skipped: KD_TEST_POSTGRES_URI is not set (sudo make postgres prints it; see docs/testing.md)"; \
	fi

test-fast: setup
	$(BIN)/pytest -q -m "not e2e"

mlproject: setup
	$(BIN)/kd-mlflow mlproject

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# A team tracking server: mlflow server on PostgreSQL with proxied artifacts (./mlartifacts),
# on 127.0.0.1:5000 unless SERVER_ARGS says otherwise, e.g. SERVER_ARGS="--host 0.0.0.0".
# The backend is $$KD_SERVER_BACKEND_STORE_URI, else postgresql://kd_mlflow@127.0.0.1:5432/kd_mlflow.
SERVER_ARGS ?=
server: setup
	$(BIN)/kd-mlflow server $(SERVER_ARGS)

# Debian: install and start PostgreSQL, create role and database kd_mlflow (needs root).
postgres:
	@if ! command -v pg_lsclusters >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql; \
	  else echo "PostgreSQL is not installed: sudo apt-get install postgresql (or run sudo make postgres)"; exit 1; fi; \
	fi
	bash scripts/postgres-setup.sh

# The reference benchmark (docs/benchmark/README.md states the protocol): every mode on
# 5,000 Fashion-MNIST images, 20 epochs, the committed resnet20 teacher -> resnet8, at the
# confirmation seeds 5-9 that no selection saw (defaults were chosen on seeds 0-1), the
# strategies too; one code version and one BENCH_THREADS per table. Hours of CPU;
# resumable: run it again and only unfinished cells train. Its MLflow store lives outside
# the repo, in $(BENCH_DIR). benchmark-extra: uda's semi-supervised setting and the
# 10-epoch check, on seeds 0-4 / 0-2.
BENCH_DIR ?= $(HOME)/kd-benchmark
BENCH_KD = cd $(BENCH_DIR) && MLFLOW_TRACKING_URI=sqlite:///$(BENCH_DIR)/mlflow.db $(CURDIR)/$(BIN)/kd-mlflow
# Cells trained at once (on a local Ray when > 1) and each cell's torch threads, which Ray
# reserves as CPUs: on 2 cores, make benchmark BENCH_JOBS=2 BENCH_THREADS=1. A CPU cell's
# numbers depend on its threads, so one table keeps one BENCH_THREADS.
BENCH_JOBS ?= 2
BENCH_THREADS ?= 1
BENCH_SEEDS = --first-seed 5 --seeds 5
BENCH_REGIME = --teacher pretrained:fashion_mnist-resnet20 --train-subset 5000 --val-size 5000 --epochs 20 \
	--threads $(BENCH_THREADS)
# Every single-training mode and every strategy the package has (built-in and installed).
BENCH_SINGLE = $(shell $(BIN)/kd-mlflow modes --kind distiller)
BENCH_STRATEGIES = $(shell $(BIN)/kd-mlflow modes --kind strategy)
BENCH_ENSEMBLE = --ensemble pretrained:fashion_mnist-resnet20,pretrained:fashion_mnist-resnet14

# multikd's second ensemble member and allkd's other teacher: trained (and recorded in
# pretrained/manifest.json) by the teacher entry point with the first teacher's recipe
# when it is not committed yet.
TEACHER2 := pretrained/fashion_mnist-resnet14.pt

$(TEACHER2): | setup data
	mkdir -p $(BENCH_DIR)
	$(BENCH_KD) teacher --arch resnet14 --epochs 12 --scheduler cosine --seed 0 --device cpu --precision fp32 \
	  --experiment pretrained-teachers

benchmark: setup data $(TEACHER2)
	mkdir -p $(BENCH_DIR)
	$(BENCH_KD) benchmark --jobs $(BENCH_JOBS) --modes $(BENCH_SINGLE) $(BENCH_SEEDS) $(BENCH_REGIME) $(BENCH_ENSEMBLE) \
	  --experiment fmnist-confirm
	$(BENCH_KD) benchmark --jobs $(BENCH_JOBS) --modes $(BENCH_STRATEGIES) $(BENCH_SEEDS) $(BENCH_REGIME) \
	  --experiment fmnist-confirm --teachers pretrained:fashion_mnist-resnet14,pretrained:fashion_mnist-resnet20 \
	  --temperatures 2,4,8 --alphas 0.5,0.9,1.0
	@$(MAKE) --no-print-directory benchmark-summary

benchmark-extra: setup data $(TEACHER2)
	mkdir -p $(BENCH_DIR)
	$(BENCH_KD) benchmark --jobs $(BENCH_JOBS) --modes nokd,kd,uda --seeds 5 $(BENCH_REGIME) --labeled-fraction 0.1 \
	  --experiment fmnist-benchmark-semisup
	$(BENCH_KD) benchmark --jobs $(BENCH_JOBS) --modes nokd,pkd,sfd --seeds 3 --teacher pretrained:fashion_mnist-resnet20 \
	  --train-subset 5000 --val-size 5000 --epochs 10 --threads $(BENCH_THREADS) --experiment fmnist-10epochs
	@$(MAKE) --no-print-directory benchmark-summary

# Tables and figures of the benchmark's experiments -> docs/benchmark/ (also while it runs).
benchmark-summary: setup
	@for exp in fmnist-confirm fmnist-benchmark-semisup fmnist-10epochs; do \
	  out=$$(mktemp -d) && \
	  (cd $(BENCH_DIR) && MLFLOW_TRACKING_URI=sqlite:///$(BENCH_DIR)/mlflow.db \
	    $(CURDIR)/$(BIN)/kd-mlflow compare --experiment $$exp --output-dir $$out > /dev/null) || \
	    { echo "$$exp: nothing to summarise yet"; rm -rf $$out; continue; }; \
	  name=$$(echo $$exp | sed -e 's/fmnist-confirm/fashion_mnist-confirm/' -e 's/fmnist-benchmark/fashion_mnist/' -e 's/^fmnist-/fashion_mnist-/') && \
	  cp $$out/summary.csv docs/benchmark/$$name.csv && cp $$out/runs.csv docs/benchmark/$$name-runs.csv && \
	  cp $$out/summary.md docs/benchmark/$$name.md && \
	  cp $$out/figures/test_acc_by_mode.png docs/benchmark/$$name-test-acc.png && \
	  cp $$out/figures/val_acc_curves.png docs/benchmark/$$name-val-curves.png && \
	  rm -rf $$out && echo "docs/benchmark/$$name.{csv,md}, -runs.csv, -test-acc.png, -val-curves.png"; \
	done

clean:
	rm -rf runs mlruns mlartifacts .pytest_cache
