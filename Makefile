# Two entry points: `make demo` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NPROC  ?= 4

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt setuptools
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e '.[test,serve,hf,fl,report,ray,edge,quant,executorch]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/plait train examples/tiny_gpt.toml --nproc $(NPROC)
	$(BIN)/plait generate runs/tiny_gpt --prompt "The list " --max-new-tokens 300 --temperature 0.8 --top-k 20

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/dp_vs_ddp.py --json benchmarks/results/dp_vs_ddp.json

clean:
	rm -rf $(VENV) runs build src/*.egg-info
