# The two commands of the README: `make demo` and `make test`. Both install what is
# needed first (Debian packages and .venv), so they work on a fresh machine.
# `make lint` is the static half of `make test`; `make unit` the fast in-process tests.
.PHONY: setup demo test lint unit coverage check-commits bench clean

BIN := .venv/bin
PYTEST := $(BIN)/pytest -q -p no:cacheprovider
# `make test` runs the tests in WORKERS processes (pytest-xdist; idle waits of one test, for a
# throttled copy or a peer, overlap another's work); WORKERS=0 runs them in this one.
WORKERS ?= 2
# The in-process subset: no server subprocess, no peer program, nothing marked slow.
UNIT := -m "not interop and not slow and not crash" tests/unit tests/protocol tests/sim

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: lint
	$(PYTEST) -n $(WORKERS) --dist worksteal

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

unit: setup
	$(PYTEST) $(UNIT)

# What `make unit` reaches of src/ (a server subprocess is not measured).
coverage: setup
	$(BIN)/coverage run --data-file=.coverage --source=deltavol -m pytest -q -p no:cacheprovider $(UNIT)
	$(BIN)/coverage report --data-file=.coverage --sort=cover

# The subjects of a branch's commits (scripts/check-commits.sh); not run on older history.
RANGE ?= main..HEAD
check-commits:
	bash scripts/check-commits.sh $(RANGE)

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf demo-data bench/work .pytest_cache .mypy_cache .coverage
