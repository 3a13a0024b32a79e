# The two commands a newcomer needs, each doing its own setup:
#   make run    start mqchat (embedded broker + bridge + history API on SQLite)
#   make test   run the test suite against real amqtt, mosquitto, SQLite and PostgreSQL
# and, for contributors:
#   make check  lint, format check, type check and import directions (CI runs it too)
#   make mosquitto-plugin   build the client-id plugin that mosquitto.conf loads

VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
# gcc unless the caller names a compiler (make's built-in default is cc).
ifeq ($(origin CC),default)
CC := gcc
endif
# The client-id plugin of mosquitto.conf (broker/mosquitto_clientid/), built here and
# installed by operators (docs/operations.md); tests load it from build/.
CLIENTID_PLUGIN := build/mqchat_clientid_bind.so

.PHONY: run test check system-deps mosquitto-plugin lock clean web

# The first install takes a minute or more: pip shows each package as it comes
# (no --quiet), so a newcomer sees progress instead of a silent terminal.
$(STAMP): pyproject.toml requirements.lock
	@echo "setting up $(VENV): the locked dependencies (requirements.lock), once"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --progress-bar on -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)
	@echo "$(VENV) is ready"

run: $(STAMP) web
	$(VENV)/bin/mqchat up $(ARGS)

system-deps:
	scripts/ensure-system-deps

mosquitto-plugin: $(CLIENTID_PLUGIN)

# Order-only: the system packages (mosquitto-dev's headers, gcc) must be there, but
# checking them is no reason to rebuild.
$(CLIENTID_PLUGIN): broker/mosquitto_clientid/clientid_bind.c | system-deps
	@mkdir -p $(dir $@)
	$(CC) -shared -fPIC -O2 -Wall -Werror -o $@ $< -lcrypto

# Tests mostly wait on brokers, daemons and databases, so more workers than cores
# (pytest-xdist), but not so many that starting daemons starves the tests' timeouts;
# the CPU-heavy tests (xdist_group "cpu_heavy") share one worker. Every fixture takes
# free ports and its own temp dir. WORKERS=1 runs in one process. One test alone:
# .venv/bin/pytest tests/test_chat.py -k round_trip
WORKERS ?= 3
test: $(STAMP) system-deps $(CLIENTID_PLUGIN) web
	$(VENV)/bin/pytest $(if $(filter 1,$(WORKERS)),,-n $(WORKERS) --dist loadgroup) $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo pyproject.toml

# Re-pin every dependency after changing pyproject.toml.
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --no-emit-index-url --no-emit-find-links \
		--extra test --extra bench --extra dev --strip-extras -o requirements.lock pyproject.toml

# The JavaScript SDK and the web app (clients/js): npm ci from package-lock.json, then
# tsc and esbuild. `make run` serves the result at http://127.0.0.1:8000/; the tests
# (tests/test_js.py) run the SDK's and the browser's tests against it.
JS := clients/js
web: $(JS)/dist/.built

$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	command -v npm >/dev/null 2>&1 || scripts/ensure-system-deps
	cd $(JS) && npm ci --no-audit --no-fund
	touch $@

$(JS)/dist/.built: $(JS)/node_modules/.installed $(JS)/tsconfig.json $(JS)/build-web.mjs $(shell find $(JS)/src -type f 2>/dev/null)
	cd $(JS) && npm run --silent build
	touch $@

# The browser tests save their screenshots to build/screenshots/ (a test run leaves the
# tree clean); this reruns them into docs/img/, for a commit that means to change them.
.PHONY: screenshots
screenshots: $(STAMP) system-deps $(CLIENTID_PLUGIN) web
	MQCHAT_SCREENSHOTS_DIR=$(CURDIR)/docs/img $(VENV)/bin/pytest -q tests/test_js.py -k web_app

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(CLIENTID_PLUGIN) $(JS)/node_modules $(JS)/dist
