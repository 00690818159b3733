# kdpipe: set-up, data, tests and the published reproductions.
#
#   make all    set-up, Fashion-MNIST, then the Hinton et al. (2015) experiment
#   make test   set-up, then the test suite (CPU only, a few minutes)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KDPIPE := $(BIN)/kdpipe
# torch and torchvision must be a matching pair or `import timm` fails with
# "operator torchvision::nms does not exist"; this pair runs on CPU and CUDA.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
DATA_ROOT ?= data
RUNS ?= runs

.PHONY: all install data test lint format hinton consistency consistency-tables clean-runs \
	cli-docs faults
# keep every file target, including those made by pattern rules (make would
# otherwise delete the cache stamps as "intermediate" files when it exits)
.SECONDARY:

all: install data hinton consistency

# The venv is created once; pip then only checks what is installed (seconds),
# so a CI run on a machine that already has torch does not reinstall it.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR) -e '.[dev]'
	$(BIN)/python -c "import timm, torch, zarr; print('kdpipe installed: torch', torch.__version__, '| timm', timm.__version__, '| zarr', zarr.__version__)"

data: install
	$(KDPIPE) fetch-data --dest $(DATA_ROOT)/fashion-mnist

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

format: install
	$(BIN)/ruff format pipeline tests
	$(BIN)/ruff check --fix pipeline tests

# --- Hinton, Vinyals & Dean (2015), the MNIST table, on Fashion-MNIST --------------------------
# A teacher is trained once and cached once at T = 20; the 784-800-800-10
# student is then trained from the cache (alpha = 0.1) and on hard labels
# alone (alpha = 1, the same loop) with the same epochs and seeds.
# Both student arms share one learning rate; 0.05 made the T = 20 soft term
# diverge (its gradient is T·(p_s − p_t), up to 20x that of the CE term).
# Every step is a file target: an interrupted `make all` resumes where it stopped.

H := $(RUNS)/hinton
SEEDS ?= 0 1 2
STUDENT_EPOCHS ?= 20
TEACHER_EPOCHS ?= 12
TEMPERATURE ?= 20
ALPHA ?= 0.1
COMMON := --data fashion-mnist --data-root $(DATA_ROOT) --overwrite
STUDENT_LR ?= 0.02
STUDENT := --model kd_mlp_800x2 --epochs $(STUDENT_EPOCHS) --lr $(STUDENT_LR) $(COMMON)

$(H)/teacher-cnn/model.json:
	$(KDPIPE) train-teacher --model kd_cnn --epochs $(TEACHER_EPOCHS) --dropout 0.3 --out $(@D) $(COMMON)

$(H)/teacher-mlp/model.json:
	$(KDPIPE) train-teacher --model kd_mlp_1200x2 --epochs $(TEACHER_EPOCHS) --dropout 0.5 --jitter 2 --out $(@D) $(COMMON)

# cache-teacher marks the store complete last; the stamp follows only a finished pass
$(H)/%-T$(TEMPERATURE).done: $(H)/teacher-%/model.json
	$(KDPIPE) cache-teacher --teacher $(H)/teacher-$* --temperature $(TEMPERATURE) --out $(H)/$*-T$(TEMPERATURE).zarr $(COMMON)
	touch $@

$(H)/student-hard-s%/model.json: $(H)/cnn-T$(TEMPERATURE).done
	$(KDPIPE) train-student $(STUDENT) --cache $(H)/cnn-T$(TEMPERATURE).zarr --alpha 1 --seed $* --out $(@D)

$(H)/student-from-cnn-s%/model.json: $(H)/cnn-T$(TEMPERATURE).done
	$(KDPIPE) train-student $(STUDENT) --cache $(H)/cnn-T$(TEMPERATURE).zarr --alpha $(ALPHA) --seed $* --out $(@D)

$(H)/student-from-mlp-s%/model.json: $(H)/mlp-T$(TEMPERATURE).done
	$(KDPIPE) train-student $(STUDENT) --cache $(H)/mlp-T$(TEMPERATURE).zarr --alpha $(ALPHA) --seed $* --out $(@D)

HINTON_RUNS := $(H)/teacher-cnn $(H)/teacher-mlp \
	$(foreach s,$(SEEDS),$(H)/student-hard-s$(s) $(H)/student-from-cnn-s$(s) $(H)/student-from-mlp-s$(s))

hinton: install data $(addsuffix /model.json,$(HINTON_RUNS))
	$(KDPIPE) report $(HINTON_RUNS) --baseline student-hard --csv docs/results/hinton.csv \
		--markdown docs/results.md --section hinton

# --- Consistent teaching (Beyer et al. 2022): views in the cache, on a 1 % transfer set -----------
# A timm resnet10t teacher (1 input channel) is trained on all of Fashion-MNIST
# with the augmentation it will label (shifts up to 4 px and left-right flips)
# and labels a random 1 % transfer set (600 images) three ways: one fixed
# plain view, 8 shift-flip views, 8 shift-flip views mixed with mixup. The
# kd_cnn student trains for the same 200 epochs and seeds from each, on hard
# labels, and online through timm's LogitDistillationTask with fresh shift-flip
# views. (On a 10 % transfer set for 40 epochs, 8 views did not beat the fixed
# teacher: see results.md.)
# (crop-flip, random-resized crops of 25-100 % of the area, is too strong for
# 28 x 28 images: the teacher labelled such views 62 % right, see results.md.)

K := $(RUNS)/consistency
K_SEEDS ?= 0 1
K_EPOCHS ?= 200
K_T ?= 4
K_ALPHA ?= 0.1
K_SUBSET ?= 0.01
K_VIEWS ?= 8
K_AUGMENT ?= shift-flip
K_CACHE := --temperature $(K_T) --subset $(K_SUBSET) $(COMMON)
K_STUDENT := --model kd_cnn --epochs $(K_EPOCHS) --eval-every 50 --lr 0.05 --warmup-epochs 10 $(COMMON)

$(K)/teacher-r10t/model.json:
	$(KDPIPE) train-teacher --model resnet10t --epochs 6 --lr 0.05 --augment $(K_AUGMENT) --out $(@D) $(COMMON)

$(K)/fixed.done: $(K)/teacher-r10t/model.json
	$(KDPIPE) cache-teacher --teacher $(K)/teacher-r10t --out $(K)/fixed.zarr $(K_CACHE)
	touch $@

$(K)/views.done: $(K)/teacher-r10t/model.json
	$(KDPIPE) cache-teacher --teacher $(K)/teacher-r10t --views $(K_VIEWS) --augment $(K_AUGMENT) --out $(K)/views.zarr $(K_CACHE)
	touch $@

$(K)/mixup.done: $(K)/teacher-r10t/model.json
	$(KDPIPE) cache-teacher --teacher $(K)/teacher-r10t --views $(K_VIEWS) --augment $(K_AUGMENT) --mix mixup --out $(K)/mixup.zarr $(K_CACHE)
	touch $@

$(K)/a-hard-s%/model.json: $(K)/fixed.done
	$(KDPIPE) train-student $(K_STUDENT) --cache $(K)/fixed.zarr --alpha 1 --seed $* --out $(@D)

$(K)/a-hard-views-s%/model.json: $(K)/views.done
	$(KDPIPE) train-student $(K_STUDENT) --cache $(K)/views.zarr --alpha 1 --seed $* --out $(@D)

$(K)/b-fixed-s%/model.json: $(K)/fixed.done
	$(KDPIPE) train-student $(K_STUDENT) --cache $(K)/fixed.zarr --alpha $(K_ALPHA) --seed $* --out $(@D)

$(K)/c-views-s%/model.json: $(K)/views.done
	$(KDPIPE) train-student $(K_STUDENT) --cache $(K)/views.zarr --alpha $(K_ALPHA) --seed $* --out $(@D)

$(K)/d-mixup-s%/model.json: $(K)/mixup.done
	$(KDPIPE) train-student $(K_STUDENT) --cache $(K)/mixup.zarr --alpha $(K_ALPHA) --seed $* --out $(@D)

$(K)/e-online-s%/model.json: $(K)/teacher-r10t/model.json
	$(KDPIPE) distill-online $(K_STUDENT) --teacher $(K)/teacher-r10t --alpha $(K_ALPHA) --temperature $(K_T) --augment $(K_AUGMENT) --subset $(K_SUBSET) --seed $* --out $(@D)

CONSISTENCY_RUNS := $(K)/teacher-r10t \
	$(foreach s,$(K_SEEDS),$(K)/a-hard-s$(s) $(K)/a-hard-views-s$(s) $(K)/b-fixed-s$(s) $(K)/c-views-s$(s) $(K)/d-mixup-s$(s) $(K)/e-online-s$(s))

# the storage table: the views cache again in float32, measured as float32, float16 and top-k
$(K)/views-f32.done: $(K)/teacher-r10t/model.json
	$(KDPIPE) cache-teacher --teacher $(K)/teacher-r10t --views $(K_VIEWS) --augment $(K_AUGMENT) --dtype float32 --out $(K)/views-f32.zarr $(K_CACHE)
	touch $@

# The teacher trains alone with every core; the caches and the 12 students then
# run two at a time with one thread each (more work done per second on 2 cores).
consistency: install data $(K)/teacher-r10t/model.json
	OMP_NUM_THREADS=1 $(MAKE) -j2 consistency-tables

consistency-tables: $(addsuffix /model.json,$(CONSISTENCY_RUNS)) $(K)/views-f32.done
	$(KDPIPE) report $(CONSISTENCY_RUNS) --baseline a-hard --csv docs/results/consistency.csv \
		--markdown docs/results.md --section consistency
	$(KDPIPE) storage $(K)/views-f32.zarr --top-k 1,2,3,5 --csv docs/results/storage.csv \
		--markdown docs/results.md --section storage

clean-runs:
	rm -rf $(RUNS)

cli-docs: install
	$(BIN)/python -m pipeline.clidoc > docs/cli.md

# --- fault campaign (issue: crash-safe, verifiable caches) -------------------------------------
# 20 random SIGKILLs of cache-teacher on a Fashion-MNIST cache, each resumed, and 200 random
# single-bit flips, each to be caught by `kdpipe verify` and by the training reader.
faults: install data $(H)/teacher-cnn/model.json
	$(BIN)/python tests/fault_campaign.py --teacher $(H)/teacher-cnn --data-root $(DATA_ROOT) \
		--work $(RUNS)/faults --markdown docs/reliability.md
