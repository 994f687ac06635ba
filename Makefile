PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test typecheck bench qemu10 clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/engine migrate

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# mypy over engine/ with the [mypy] settings in setup.cfg
typecheck: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/population.py
	$(BIN)/python bench/precopy.py
	$(BIN)/python bench/multifd.py
	$(BIN)/python bench/rss.py

# QEMU 10.0 from bookworm-backports, unpacked into .qemu10/ (needs root for apt).
qemu10:
	.ci/qemu10

clean:
	rm -rf $(VENV) build *.egg-info
