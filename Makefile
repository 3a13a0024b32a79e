# The two commands a newcomer needs, each doing its own setup:
#   make run    start mqchat (embedded broker + bridge + history API on SQLite)
#   make test   run the test suite against real amqtt, mosquitto, SQLite and PostgreSQL
# and, for contributors:
#   make check  lint, format check and type check (CI runs it too)

VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed

.PHONY: run test check system-deps lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mqchat up $(ARGS)

system-deps:
	scripts/ensure-system-deps

test: $(STAMP) system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Re-pin every dependency after changing pyproject.toml.
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --no-emit-index-url --no-emit-find-links \
		--extra test --extra bench --extra dev --strip-extras -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
