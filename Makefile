# The two set-up commands. Each installs what it needs (torch pinned to the CPU build 2.13.0 first, so pip
# never pulls CUDA packages) and then does its job.
PY ?= python3

.PHONY: demo test install install-dev

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .

install-dev:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(PY) -m kiln run graphs/txt2img.json

test: install-dev
	$(PY) -m pytest -q
