# Set-up and main entry points. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench clean cirh-tool cirh-tool-if-possible

install: $(STAMP)

# torch is pinned and installed first: the CPU wheel kept on these machines. A looser
# requirement resolved first would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Cerebras's torch-cirh-opt: the Torch -> CIRH lowering cstorch runs on every graph it traces.
# Unpacked from the cerebras-pytorch wheel on PyPI (BSD-3-Clause; Linux x86-64, built for
# CPython 3.11, but the tool itself is a statically linked executable: no Python, no torch 2.4):
# only the tool, into .tools/cirh/ (ignored by git), where `mmgraph compile` finds it. The wheel's
# hash is pinned; pip's cache keeps a second fetch local.
CIRH_VERSION := 2.10.0
CIRH_WHEEL_SHA256 := feebb5f542f89d21cea3af2c2b34cba5cac14d08733b79df629113bd5b1b0daa
CIRH_DIR  := .tools/cirh
CIRH_TOOL := $(CIRH_DIR)/torch-cirh-opt
cirh-tool: $(CIRH_TOOL)

$(CIRH_TOOL): | $(STAMP)
	rm -rf $(CIRH_DIR)/dl && mkdir -p $(CIRH_DIR)/dl
	echo "cerebras-pytorch==$(CIRH_VERSION) --hash=sha256:$(CIRH_WHEEL_SHA256)" > $(CIRH_DIR)/dl/requirements.txt
	$(PY) -m pip download --quiet --no-deps --require-hashes --only-binary=:all: --python-version 3.11 \
		--platform manylinux2014_x86_64 -r $(CIRH_DIR)/dl/requirements.txt -d $(CIRH_DIR)/dl
	$(PY) -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('cerebras/pytorch/lib/torch-cirh-opt'))" \
		$(CIRH_DIR)/dl/cerebras_pytorch-$(CIRH_VERSION)-*.whl $(CIRH_TOOL).tmp
	chmod +x $(CIRH_TOOL).tmp
	$(CIRH_TOOL).tmp --version > /dev/null
	mv $(CIRH_TOOL).tmp $(CIRH_TOOL)
	rm -rf $(CIRH_DIR)/dl
	@echo "== $(CIRH_TOOL) (cerebras-pytorch $(CIRH_VERSION)); mmgraph compile finds it here"

# For `make test`: the tool where it can be had (PyPI reachable, Linux x86-64); otherwise one
# line, and the tests that need it skip with that reason.
cirh-tool-if-possible: | $(STAMP)
	@$(MAKE) --no-print-directory cirh-tool || echo "== no $(CIRH_TOOL): the vendor-tool tests will skip"

DATA := model_dir/data
MM   := OMP_NUM_THREADS=1 $(VENV)/bin/mmgraph
# The main job on the embedded default: synthetic data -> compile (verified) -> phase 1 -> phase 2
# with eval on held-back questions -> answers to questions about two held-back images
# (004200.png and 004201.png are eval images: "two" and "top" are right).
# One thread: the tiny model gains nothing from two, and two threads stall whenever anything else
# runs on a 2-core machine.
demo: install
	$(MM) data synth --output_dir $(DATA)
	$(MM) preprocess --input_json $(DATA)/phase1_train.json --image_dir $(DATA)/images \
		--tokenizer $(DATA)/tokenizer --output_dir $(DATA)/phase1 --phase 1 \
		--params configs/params_mm_llava_demo_phase1.yaml --num_workers 2 --pack
	$(MM) preprocess --input_json $(DATA)/phase2_train.json --image_dir $(DATA)/images \
		--tokenizer $(DATA)/tokenizer --output_dir $(DATA)/phase2 --phase 2 \
		--params configs/params_mm_llava_demo_phase2.yaml --num_workers 2
	$(MM) preprocess --input_json $(DATA)/phase2_eval.json --image_dir $(DATA)/images \
		--tokenizer $(DATA)/tokenizer --output_dir $(DATA)/phase2_eval --phase 2 \
		--params configs/params_mm_llava_demo_phase2.yaml --num_workers 2
	$(MM) check --params configs/params_mm_llava_llama2_7b_phase2.yaml
	$(MM) compile --params configs/params_mm_llava_demo_phase2.yaml --model_dir model_dir/demo_compile --verify
	$(MM) run CPU --mode train --params configs/params_mm_llava_demo_phase1.yaml --model_dir model_dir/demo_phase1
	$(MM) run CPU --mode train_and_eval --params configs/params_mm_llava_demo_phase2.yaml --model_dir model_dir/demo_phase2
	$(MM) generate --params configs/params_mm_llava_demo_phase2.yaml --checkpoint_path model_dir/demo_phase2 \
		--image $(DATA)/images/004200.png --prompt "how many shapes are there ?"
	$(MM) generate --params configs/params_mm_llava_demo_phase2.yaml --checkpoint_path model_dir/demo_phase2 \
		--image $(DATA)/images/004201.png --prompt "where is the shape ?"
	rm -rf model_dir/demo_phase2_hf
	$(MM) convert --src-fmt native --tgt-fmt hf --output-dir model_dir/demo_phase2_hf model_dir/demo_phase2
	@echo "== done. model_dir/demo_compile/compile/ (dumps, report.html); model_dir/demo_phase{1,2}/: compile/, checkpoints/, metrics.jsonl, events/ (tensorboard --logdir model_dir)"
	@echo "== export: model_dir/demo_phase2_hf/ (transformers LLaVA: weights, tokenizer, processor, chat template; docs/convert.md: evaluating it with lmms-eval)"

test: install cirh-tool-if-possible
	$(PY) -m pytest -q -n 2

# Also the tests marked slow.
test-all: install cirh-tool-if-possible
	$(PY) -m pytest -q -n 2 -m ''

# Every benchmark at its modest default size, results as JSON, then BENCHMARKS.md and its plots
# (benchmarks/plots/) rendered from them. About 75 minutes on 2 cores (bench_remat about 4, bench_memory about 35 on a loaded machine, bench_gpu_cluster about 8, bench_legalize about 12, bench_modelzoo about 4): the compile benchmark
# (7B at 8/16/32 layers, 5 runs each; torch.compile's cold first call, 3 runs) about 5, the
# runtime's small and medium configs (and both on CUDA where there is a GPU) about 4.
RESULTS := benchmarks/results
bench: install cirh-tool-if-possible
	$(PY) -m benchmarks.bench_compile --out $(RESULTS)/compile.json
	$(PY) -m benchmarks.bench_simulator --rounds 3 --repeats 9 --out $(RESULTS)/simulator.json
	$(PY) -m benchmarks.bench_runtime --out $(RESULTS)/runtime.json
	$(PY) -m benchmarks.bench_freeze --out $(RESULTS)/freeze.json
	$(PY) -m benchmarks.bench_remat --out $(RESULTS)/remat.json
	$(PY) -m benchmarks.bench_memory --out $(RESULTS)/memory.json
	$(PY) -m benchmarks.bench_gpu_cluster --out $(RESULTS)/gpu_cluster.json
	$(PY) -m benchmarks.bench_data --out $(RESULTS)/data.json
	$(PY) -m benchmarks.bench_convert --out $(RESULTS)/convert.json
	$(PY) -m benchmarks.bench_generate --out $(RESULTS)/generate.json
	$(PY) -m benchmarks.bench_packing --out $(RESULTS)/packing.json
	$(PY) -m benchmarks.bench_data_parallel --out $(RESULTS)/data_parallel.json
	$(PY) -m benchmarks.bench_startup --out $(RESULTS)/startup.json
	$(PY) -m benchmarks.bench_legalize --out $(RESULTS)/legalize.json
	$(PY) -m benchmarks.bench_modelzoo --out $(RESULTS)/modelzoo.json
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) model_dir .pytest_cache *.egg-info
