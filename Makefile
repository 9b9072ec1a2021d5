# meddx — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
# torch first, pinned, so pip takes the CPU wheel and not a multi-GB CUDA build
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# the public API, type-checked with mypy --strict by `make lint` (settings in pyproject.toml)
MYPY_FILES := src/meddx/__init__.py src/meddx/version.py src/meddx/errors.py src/meddx/registry.py \
	src/meddx/tasks.py src/meddx/config.py src/meddx/modalities/__init__.py \
	src/meddx/modalities/base.py src/meddx/modalities/loading.py src/meddx/fhir/cds.py \
	src/meddx/package.py src/meddx/inference/__init__.py src/meddx/inference/prediction.py

.PHONY: install demo test test-fast bench lint docs chromium orthanc clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# headless Chromium for the report and web-page tests (Debian package; needs root or sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Orthanc (the open PACS) with its DICOMweb plugin, started by the DICOM tests as a plain
# process on loopback (tests/orthanc_support.py); Debian packages, needs root or sudo
orthanc:
	@{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } && \
	  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/meddx train configs/breastmnist-demo.yaml --out runs/demo
	$(VENV)/bin/meddx evaluate runs/demo/model --dataset breastmnist --split test --out runs/demo/eval

test: lint docs chromium orthanc
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/medmnist.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy $(MYPY_FILES)

# the documentation site (MkDocs, Material theme) from docs/; --strict: a broken link or a
# page left out of nav fails the build. Open build/site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

clean:
	rm -rf runs build .pytest_cache
