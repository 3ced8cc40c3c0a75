# ferry: every target that needs Python runs it from .venv, which `setup` creates.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo gen bench lint guest

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/ferry demo --backend sim --memory 1GiB

gen: setup
	$(PY) -m codegen

bench: setup
	$(VENV)/bin/ferry bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The KVM guest program: its source is hypervisor/guest/guest.S; the built
# bytes are checked in (tests compare them with a fresh build where GNU as exists).
guest:
	as --32 -o hypervisor/guest/guest.o hypervisor/guest/guest.S
	objcopy -O binary hypervisor/guest/guest.o hypervisor/guest/guest.bin
	rm -f hypervisor/guest/guest.o
