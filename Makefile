# nstap: the two commands of the README, and the pieces they are made of.
#   make run    install what is missing, start the runtimes, run the daemon in the foreground
#   make test   install what is missing, start the runtimes, run the whole test suite
#   make soak   the chaos and soak tests at full size (1,000 mixed and 5,000 Docker churn cycles, 100,000 sockets, 10,000 inputs)
#   make lock   deploy/requirements.lock again (pip-compile --generate-hashes; ARGS=--upgrade to move versions)
#   make docs   docs/reference/ again from the code (metrics, configuration, detectors, API, CLI)
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test soak lock deps-run deps-test deps-demo runtimes venv venv-bench bench bench-plot bench-capture bench-evidence bench-upload bench-detect bench-nat bench-ebpf bench-cause containerd-api dashboards docs clean demo demo-clean install uninstall

run: deps-run venv runtimes
	$(VENV)/bin/nstap run $(ARGS)

test: deps-test venv runtimes
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

soak: deps-test venv runtimes
	mkdir -p bench/results
	rm -f bench/results/soak.jsonl
	NSTAP_SOAK=1 NSTAP_SOAK_REPORT=bench/results/soak.jsonl $(VENV)/bin/python -m pytest -m soak -s $(PYTEST_ARGS)
	@echo "figures: bench/results/soak.jsonl"

# The hashed lock the image is built from (pip-tools in a venv of its own: make test never needs it).
lock:
	PYTHON=$(PYTHON) deploy/lock.sh $(ARGS)

deps-run:
	deploy/install-deps.sh run

deps-test:
	deploy/install-deps.sh test

deps-demo:
	deploy/install-deps.sh demo

runtimes:
	deploy/start-runtimes.sh

venv: $(VENV)/.installed
	deploy/link-bcc.sh $(VENV)

$(VENV)/.installed: pyproject.toml setup.py daemon/nstap/netns/_scan.c daemon/nstap/_exposition.c
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	deploy/pip-install.sh $(VENV) --upgrade pip
	deploy/pip-install.sh $(VENV) -e '.[test]'
	touch $@

# The benchmarks' own packages (matplotlib, py-spy): the bench extra, on top of the test one.
venv-bench: venv $(VENV)/.installed-bench

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	deploy/pip-install.sh $(VENV) -e '.[test,bench]'
	touch $@

# make bench ARGS="--containers 50,200,500,1000": the cost claims, one JSON line per size in
# bench/results/sampling.jsonl, and the plot bench/sampling.png (make bench-plot redraws it).
bench: deps-test venv-bench runtimes
	$(VENV)/bin/python bench/bench_sampling.py $(ARGS)

bench-plot: venv-bench
	$(VENV)/bin/python bench/plot_sampling.py $(ARGS)

bench-capture: deps-test venv-bench runtimes
	$(VENV)/bin/python bench/bench_capture.py $(ARGS)

bench-evidence: deps-test venv-bench
	$(VENV)/bin/python bench/bench_evidence.py $(ARGS)

# What uploading captures to S3-compatible storage costs the daemon (docs/performance.md: Uploads).
bench-upload: deps-test venv-bench
	$(VENV)/bin/python bench/bench_upload.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info .pytest_cache

demo: deps-demo venv runtimes
	deploy/demo.sh up

bench-ebpf: deps-test venv-bench runtimes
	$(VENV)/bin/python bench/bench_ebpf.py $(ARGS)

bench-nat: deps-test venv-bench runtimes
	$(VENV)/bin/python bench/bench_nat.py $(ARGS)

bench-detect: deps-test venv-bench runtimes
	$(VENV)/bin/python bench/bench_detect.py $(ARGS)

# The share of anomalies whose cause nstap names right, per injected fault class (docs/performance.md: Causes).
bench-cause: deps-test venv-bench runtimes
	$(VENV)/bin/python bench/bench_cause.py $(ARGS)

demo-clean:
	deploy/demo.sh down

# The containerd API stubs (daemon/nstap/runtime/containerd_api/) from Debian's containerd .proto files.
containerd-api: deps-test venv
	deploy/gen-containerd-api.sh $(VENV)/bin/python

dashboards: venv
	$(VENV)/bin/python grafana/dashboards.py

# The reference pages (docs/reference/*.md) from the code they describe; tests/test_docs.py fails
# when a committed page is not what this writes.
docs: venv
	$(VENV)/bin/python -m nstap.docs

install: deps-run
	deploy/install.sh

uninstall:
	deploy/uninstall.sh
