# Two commands on a fresh machine (see README):
#   make demo   installs everything, then runs the main job on the embedded synthetic data
#   make test   installs everything, then runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/demo

.PHONY: install demo test clean

$(BIN)/retrieve: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned, so nothing resolves an open-ended torch (a CUDA build).
	$(BIN)/pip install -q torch==2.13.0 $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/retrieve

install: $(BIN)/retrieve

demo: install
	$(BIN)/retrieve generate --out $(RUN)/data
	$(BIN)/retrieve train --interactions $(RUN)/data/interactions.csv --items $(RUN)/data/items.csv \
	    --users $(RUN)/data/users.csv --interests 4 --out $(RUN)/mind_k4
	$(BIN)/retrieve train --interactions $(RUN)/data/interactions.csv --items $(RUN)/data/items.csv \
	    --users $(RUN)/data/users.csv --interests 1 --out $(RUN)/mind_k1
	$(BIN)/retrieve build-index --bundle $(RUN)/mind_k4 --out $(RUN)/index_k4
	$(BIN)/retrieve query --bundle $(RUN)/mind_k4 --index $(RUN)/index_k4 --user u00001 -n 10
	$(BIN)/retrieve evaluate --bundle $(RUN)/mind_k4 --index $(RUN)/index_k4 \
	    --k1-bundle $(RUN)/mind_k1 --out $(RUN)/report.json

test: install
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs
