# Set-up is two commands: `make demo` and `make test`. Both create .venv and install requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`, one thread each (tests/conftest.py); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	PYTHON=$(PY) bash scripts/quickstart.sh

# Every benchmark's code path: at the design size on a GPU (the "Speed on a GPU" table), at tiny size on a CPU
# (a dry run of a few minutes). Results in outputs/bench; the single benches are in README's table.
bench: $(STAMP)
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  OUT=outputs/bench PYTHON=$(PY) bash bench/gpu_session.sh; \
	else \
	  TINY=1 OUT=outputs/bench PYTHON=$(PY) bash bench/gpu_session.sh; \
	fi

clean:
	rm -rf outputs work_dir
