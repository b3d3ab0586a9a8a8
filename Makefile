# Two commands on a fresh machine with Python >= 3.11: `make serve`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test bench lint format clean

# pip is quiet (its output is pages long): these lines say what is going on meanwhile.
$(BIN)/imaging-scp: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	@echo "make: creating the virtual environment $(VENV) with $$($(PYTHON) --version)"
	@$(PYTHON) -m venv $(VENV)
	@echo "make: installing imaging-scp and its dependencies into $(VENV) with pip (once; a minute or more on a slow network)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@
	@echo "make: installed $(BIN)/imaging-scp"

serve: $(BIN)/imaging-scp
	@echo "make: $(BIN)/imaging-scp serve $(ARGS) (Ctrl-C stops it)"
	@$(BIN)/imaging-scp serve $(ARGS)

# fhirclient's R4 release for tests/test_web.py. It has the import name of the DSTU2 release
# the test extra pins (tests/test_fhir.py), so it goes into a directory of its own, which that
# test puts on the path of the process it runs it in.
FHIRCLIENT_R4 := $(VENV)/fhirclient-r4

$(FHIRCLIENT_R4): $(BIN)/imaging-scp
	@echo "make: installing fhirclient's R4 release into $@"
	@rm -rf $@ $@.partial
	@$(BIN)/python -m pip install --quiet --target $@.partial 'fhirclient==4.4.0'
	@mv $@.partial $@

test: $(BIN)/imaging-scp $(FHIRCLIENT_R4)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(BIN)/imaging-scp
	$(BIN)/python -m benchmarks.run $(ARGS)

lint: $(BIN)/imaging-scp
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(BIN)/imaging-scp
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
