# The two set-up commands. Each installs what it needs (torch 2.13.0 first, the build chosen for this machine by
# tools/install_torch.py: CPU wheels without an NVIDIA GPU, CUDA with one, KILN_TORCH=cpu|cuda|URL|skip to
# choose) and then does its job.
PY ?= python3

.PHONY: demo test install install-dev

install:
	$(PY) tools/install_torch.py
	$(PY) -m pip install -q -e .

install-dev:
	$(PY) tools/install_torch.py
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(PY) -m kiln run graphs/txt2img.json

test: install-dev
	$(PY) -m pytest -q
