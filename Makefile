# Developer shortcuts; CI runs ci/test.sh (the README's test command).
PY ?= .venv/bin/python

.PHONY: compile debug test quicktest lint typecheck demo clean

compile:
	$(PY) setup.py build_ext --inplace

debug:
	PROXY_DEBUG=1 $(PY) setup.py build_ext --inplace --force

test:
	bash ci/test.sh

quicktest: compile
	$(PY) -m pytest tests/unit tests/core -q

lint:
	.venv/bin/ruff check proxy tests
	.venv/bin/ruff format --check proxy tests

typecheck:
	.venv/bin/mypy --no-incremental

demo:
	bash ci/demo.sh

clean:
	rm -rf build proxy/_splice.c proxy/*.so proxy/*.html
