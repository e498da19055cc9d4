# The two commands of the README: `make demo` and `make test`. Both install what is
# needed first (Debian packages and .venv), so they work on a fresh machine.
.PHONY: setup demo test lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

bench: setup
	.venv/bin/python -m bench

clean:
	rm -rf demo-data bench/work .pytest_cache
