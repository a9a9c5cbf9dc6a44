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

# The browser tests (tests/server/test_editor_browser.py) need ComfyUI's frontend (the `ui` extra) and Debian's
# chromium + chromium-driver: installed here when missing and apt-get is usable as root; otherwise those tests
# report "skipped: no browser". This step never fails the build.
test:
	$(PY) tools/install_torch.py
	$(PY) -m pip install -q -e ".[dev,ui]"
	@if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium + chromium-driver for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
			>/dev/null 2>&1 || echo "could not install chromium: the browser tests will be skipped"; \
	else echo "no chromium and no root apt-get: the browser tests will be skipped"; fi
	$(PY) -m pytest -q
