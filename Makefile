# dts — the two commands of the quick start are `make run` and `make test`.
# Everything else here is what those two need on a fresh Debian/Ubuntu machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests drive as real peers: dcmtk (storescu/storescp/echoscu),
# dicom3tools (dciodvfy checks every object the result builder makes),
# Orthanc (a PACS), podman + runc (a Docker-compatible engine), PostgreSQL (journal DB),
# busybox-static (a root filesystem for test container images), logrotate (its dts file
# is run by the tests), chromium + chromium-driver (the page in a real browser, Selenium),
# slurm-wlm + munge (a one-node Slurm cluster: slurmctld, slurmd, the client commands),
# orthanc-dicomweb (Orthanc's DICOMweb plugin: STOW-RS both ways).
TEST_DEBS := dcmtk dicom3tools orthanc orthanc-dicomweb podman runc busybox-static postgresql logrotate \
             systemd chromium chromium-driver slurm-wlm munge
TEST_BINS := /usr/bin/storescu /usr/bin/storescp /usr/bin/echoscu /usr/sbin/Orthanc \
             /usr/bin/dciodvfy /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
             /usr/bin/podman /usr/sbin/runc /bin/busybox /usr/sbin/logrotate \
             /usr/bin/systemd-analyze /usr/bin/chromium /usr/bin/chromedriver \
             /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/squeue \
             /usr/bin/scontrol /usr/bin/scancel /usr/bin/sinfo /usr/sbin/munged

.PHONY: run test unit venv system-deps lint typecheck bench clean-venv

$(BIN)/dts: pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "installing python3-venv"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/dts

## Start the station (receiver + every stage) on the embedded default configuration.
run: venv
	@echo "dts: DICOM on port 11112 (AE DTS); the page on http://127.0.0.1:8080/ ([web] in configuration/dts.toml)"
	$(BIN)/dts --config configuration/dts.toml --spool spool watch

system-deps:
	@missing=0; for f in $(TEST_BINS) $$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -1 || echo /usr/lib/postgresql/none/bin/initdb); do \
	  [ -e "$$f" ] || missing=1; done; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing=1; \
	if [ $$missing = 1 ]; then \
	  echo "installing test peers: $(TEST_DEBS)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_DEBS) \
	    $$($(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || echo python3-venv) >/dev/null; \
	fi

## Install what the tests need (system packages too) and run them all.
test: system-deps venv
	$(BIN)/mypy dts
	$(BIN)/pytest -q tests

## The tests that need no real peer (no root, no apt): a developer's quick check.
unit: venv
	$(BIN)/pytest -q -m "not peers and not slow" tests

lint: venv
	$(BIN)/ruff check dts tests

typecheck: venv
	$(BIN)/mypy dts

## Benchmarks against dcmtk and Orthanc (prints ratios; never part of `make test`).
bench: system-deps venv
	for b in receive send classify run e2e index web builders priors stow burst memory; do $(BIN)/python -m tests.bench.bench_$$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
