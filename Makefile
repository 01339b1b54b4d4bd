# calokit Makefile -- `make all` runs the chain, `make test` proves it.
#
#   make all                       toy hits -> voxels -> train -> select -> export (lwtnn JSON + ONNX) -> evaluate
#                                  -> summary (DATASET=demo)
#   make all DATASET=1-photons     the same on the CaloChallenge files in DATA_DIR (downloaded if absent)
#   make test                      the test suite (creates .venv from requirements.txt first)
#   make smoke                     a quick check after a change (< 1 min): every script once on tiny data
#   make voxels|train|select|export|evaluate   one stage (and what it needs) for every slice
#   make -j2 all ETAS="0.20 0.25"  several |eta| slices, trained in parallel
#   make -j2 all DEMO=3x2          photons, electrons and pions in 2 slices each (6 GANs), then one summary
#   make summary                   results/<dataset>/summary/: response/resolution per slice and across |eta|,
#                                  a table of every GAN (builds what is missing first)
#   make summary-now               the same summary of whatever is there now (slices still running or failed
#                                  are listed with their state); builds nothing
#   make condor / make slurm       the same per-slice chain as an HTCondor DAG / a Slurm job array, plus a
#                                  summary node after all chains; `make condor DEMO=barrel`: 78 chains
#   make baseline                  evaluate an untrained (1-iteration) generator the same way, for comparison
#   make clean | make clean-slice SLICE=photon_0.20   remove every slice's files / one slice's
#   make clean-hits                the toy hits (~0.8 GB per slice) once voxelised; nothing is redone for them
#
# Variables (override on the command line, e.g. `make all ITERATIONS=20000`):
#   DATASET     demo | 1-photons | 1-pions | 2 | 3                                   (demo)
#   PARTICLES   particles of the demo: photon, electron and/or pion                   (photon)
#   ETAS        lower |eta| edges of the slices to run (0.05 wide, 0.00 .. 1.25)       (0.20)
#   DEMO        a named set of slices (sets PARTICLES and ETAS; empty = use them):     (empty)
#               3x2 = photon electron pion x 0.20 0.25 (6 GANs; run it with make -j2);
#               barrel = photon electron pion x all 26 barrel slices 0.00 .. 1.25 (78 GANs: a cluster job)
#   EVENTS      toy events per energy point (demo), for training and for held-out     (1000)
#   ITERATIONS  generator iterations per GAN (FastCaloGAN trained up to 1,000,000)    (6000)
#   CKPT_EVERY  checkpoint interval in iterations (FastCaloGAN: 1000)                 (100)
#   RANGE       energy range per GAN: all | low | high (e/gamma), all (pions)         (all)
#   SELECT_EVENTS showers generated per checkpoint and energy in select_epoch.py      (2000)
#   CLS_EPOCHS  epochs of the evaluate.py classifiers (reference: 50)                 (10)
#   TRAIN_ARGS  extra train.py flags. demo: --n-critic 2 --lr 2e-4 (FastCaloGAN's networks, batch-norm in inference
#               mode as it trains them; 2 critic steps and lr 2e-4 buy twice the generator updates in the same
#               CPU time; measured, see README). CaloChallenge data: none (FastCaloGAN's settings)
#   SELECT_ARGS extra select_epoch.py flags. demo: --overflow (showers outside the E_tot chi2 window count,
#               else a badly wide early checkpoint wins); CaloChallenge data: none (ROOT's default test)
#   EXPORT_ARGS extra export_lwtnn.py flags; EVAL_ARGS extra evaluate.py flags            (none)
#   SUMMARY_ARGS extra summary.py flags, e.g. --energies 1024 16384 262144                (none)
#   SEED        seed of every step                                                    (1)
#   DATA_DIR    where CaloChallenge files are looked for / downloaded to              (data)
#   WORK, RESULTS  intermediate and final output folders          (work/$(DATASET), results/$(DATASET))
#   PYTHON, VENV, REQS, PYTEST_ARGS   interpreter, venv folder, requirements file, extra pytest args
#   PY_EXE      use this python instead of the venv (no install step)
PYTHON ?= python3
VENV ?= .venv
REQS ?= requirements.txt
PYTEST_ARGS ?=
DATASET ?= demo
PARTICLES ?= photon
ETAS ?= 0.20
DEMO ?=
BARREL_ETAS := 0.00 0.05 0.10 0.15 0.20 0.25 0.30 0.35 0.40 0.45 0.50 0.55 0.60 0.65 0.70 0.75 0.80 0.85 0.90 \
    0.95 1.00 1.05 1.10 1.15 1.20 1.25
ifeq ($(DEMO),3x2)
  PARTICLES := photon electron pion
  ETAS := 0.20 0.25
else ifeq ($(DEMO),barrel)
  PARTICLES := photon electron pion
  ETAS := $(BARREL_ETAS)
else ifneq ($(DEMO),)
  $(error DEMO must be empty, 3x2 or barrel, not '$(DEMO)')
endif
EVENTS ?= 1000
ITERATIONS ?= 6000
CKPT_EVERY ?= 100
RANGE ?= all
SELECT_EVENTS ?= 2000
EXPORT_ARGS ?=
EVAL_ARGS ?=
SUMMARY_ARGS ?=
CLS_EPOCHS ?= 10
SEED ?= 1
DATA_DIR ?= data
WORK ?= work/$(DATASET)
RESULTS ?= results/$(DATASET)

# PY_EXE=/path/to/python runs the chain with an existing interpreter and skips the venv step (tests, clusters)
ifdef PY_EXE
  PY := $(PY_EXE)
  STAMP :=
else
  PY := $(VENV)/bin/python
  STAMP := $(VENV)/.installed-$(notdir $(REQS))
endif
export MPLBACKEND := Agg
export TF_CPP_MIN_LOG_LEVEL := 2

# --- what a dataset means -------------------------------------------------------------------------
# demo: one GAN per (particle, eta) slice on toy hits, evaluated against held-out toy showers.
# CaloChallenge: file _1 trains (and chooses the epoch), file _2 is the held-out reference.
ifeq ($(DATASET),demo)
  SLICES := $(foreach p,$(PARTICLES),$(foreach e,$(ETAS),$(p)_$(e)))
else ifeq ($(DATASET),1-photons)
  SLICES := photon_0.20
  CC_FILES := dataset_1_photons_1.hdf5 dataset_1_photons_2.hdf5
else ifeq ($(DATASET),1-pions)
  SLICES := pion_0.20
  CC_FILES := dataset_1_pions_1.hdf5 dataset_1_pions_2.hdf5
else ifeq ($(DATASET),2)
  SLICES := electron_0.20
  CC_FILES := dataset_2_1.hdf5 dataset_2_2.hdf5
else ifeq ($(DATASET),3)
  SLICES := electron_0.20
  CC_FILES := dataset_3_1.hdf5 dataset_3_2.hdf5
else
  $(error DATASET must be one of demo 1-photons 1-pions 2 3, not '$(DATASET)')
endif
# demo-only training and epoch-choice settings (FastCaloGAN's own defaults stay in train.py / select_epoch.py)
ifeq ($(DATASET),demo)
  TRAIN_ARGS ?= --n-critic 2 --lr 2e-4
  SELECT_ARGS ?= --overflow
else
  TRAIN_ARGS ?=
  SELECT_ARGS ?=
endif

# slice "photon_0.20" -> particle, eta; the evaluate.py dataset and binning of a particle
part = $(word 1,$(subst _, ,$(1)))
eta = $(word 2,$(subst _, ,$(1)))
ifeq ($(DATASET),demo)
  evalds = $(if $(filter pion,$(call part,$(1))),1-pions,1-photons)
else
  evalds = $(DATASET)
endif
BINNING_1-photons := binning/binning_dataset_1_photons.xml
BINNING_1-pions := binning/binning_dataset_1_pions.xml
BINNING_2 := binning/binning_dataset_2.xml
BINNING_3 := binning/binning_dataset_3.xml
# the demo voxelises with the FastCaloGAN multi-slice XML (same layer binning as dataset 1, per-slice names;
# electrons have the photons' e/gamma binning, so evaluate.py judges them as dataset 1-photons)
ifeq ($(DATASET),demo)
  binning = binning/binning_fastcalogan.xml
else
  binning = $(BINNING_$(call evalds,$(1)))
endif

.PHONY: all baseline venv test smoke bench data voxels train select export evaluate summary summary-now condor slurm \
    clean clean-hits clean-slice clean-venv help
.DELETE_ON_ERROR:
.SECONDARY:

all: $(foreach s,$(SLICES),$(RESULTS)/$(s)/eval/metrics.json $(RESULTS)/$(s)/lwtnn/.done) $(RESULTS)/summary/summary.json
	@echo "calokit: results in $(RESULTS)/ for slices: $(SLICES) (summary: $(RESULTS)/summary/)"

help:
	@awk '/^#/ { print; next } { exit }' Makefile

# --- environment ----------------------------------------------------------------------------------
# The venv is (re)built only when the requirements file changes.
venv: $(STAMP)
ifneq ($(STAMP),)
$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(REQS)
	touch $@
endif

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# a quick check after a change (well under a minute): every script once on tiny data, real values asserted
smoke: $(STAMP)
	$(PY) -m pytest -q -m smoke $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b --quick; done

# --- per-stage targets ----------------------------------------------------------------------------
voxels:   $(foreach s,$(SLICES),$(WORK)/$(s)/voxels.h5 $(WORK)/$(s)/voxels_heldout.h5)
train:    $(foreach s,$(SLICES),$(WORK)/$(s)/run/.done)
select:   $(foreach s,$(SLICES),$(RESULTS)/$(s)/select/best.json)
export:   $(foreach s,$(SLICES),$(RESULTS)/$(s)/lwtnn/.done)
evaluate: $(foreach s,$(SLICES),$(RESULTS)/$(s)/eval/metrics.json)

# Every rule lists every file its recipe runs (the stage script, the shared modules, the toy source, the
# binning XML) and a settings stamp: $(WORK)/<slice>/settings/<stage> holds the Make settings that feed the stage
# and is rewritten (when Make reads this file) only when they change, so `make all ITERATIONS=600` redoes
# training and what follows it, and nothing else; `make -n all ITERATIONS=600` lists exactly that (and so
# records the new settings too: a dry run with other settings makes the next real run redo those stages).
SHARED := HighLevelFeatures.py plumbing.py
settings = $(WORK)/$(1)/settings/$(2)
STAGES := hits prepare train select export eval
SETTINGS_hits = EVENTS=$(EVENTS) SEED=$(SEED)
SETTINGS_prepare = RANGE=$(RANGE)
SETTINGS_train = ITERATIONS=$(ITERATIONS) CKPT_EVERY=$(CKPT_EVERY) SEED=$(SEED) TRAIN_ARGS=$(TRAIN_ARGS)
SETTINGS_select = SELECT_EVENTS=$(SELECT_EVENTS) SEED=$(SEED) SELECT_ARGS=$(SELECT_ARGS)
SETTINGS_export = EXPORT_ARGS=$(EXPORT_ARGS)
SETTINGS_eval = CLS_EPOCHS=$(CLS_EPOCHS) SEED=$(SEED) EVAL_ARGS=$(EVAL_ARGS)
write_stamp = $(shell mkdir -p $(dir $(1)) && { printf '%s\n' '$(2)' | cmp -s - $(1) || printf '%s\n' '$(2)' > $(1); })
NO_STAMP_GOALS := test smoke help venv bench clean clean-hits clean-venv clean-slice condor slurm data summary-now
# the summary's stamp (one for the dataset): which slices it covers and its flags
SUMMARY_STAMP := $(WORK)/settings/summary
SETTINGS_summary = SLICES=$(SLICES) SUMMARY_ARGS=$(SUMMARY_ARGS)
ifneq ($(filter-out $(NO_STAMP_GOALS),$(or $(MAKECMDGOALS),all)),)
  $(foreach s,$(SLICES),$(foreach st,$(STAGES),$(call write_stamp,$(call settings,$(s),$(st)),$(SETTINGS_$(st)))))
  $(call write_stamp,$(SUMMARY_STAMP),$(SETTINGS_summary))
endif
$(WORK)/%/settings/hits $(WORK)/%/settings/prepare $(WORK)/%/settings/train $(WORK)/%/settings/select \
$(WORK)/%/settings/export $(WORK)/%/settings/eval: ;
$(SUMMARY_STAMP): ;

ifeq ($(DATASET),demo)
# toy hits: one seed for training, another for the held-out reference
TOY := preprocess.py toyshower.py $(SHARED)
$(WORK)/%/hits/.done: $(TOY) $(call settings,%,hits) | $(STAMP)
	rm -rf $(@D)
	$(PY) preprocess.py toy --particle $(call part,$*) --eta $(call eta,$*) --events-per-energy $(EVENTS) --seed $(SEED) --out $(@D)
	touch $@
$(WORK)/%/hits_heldout/.done: $(TOY) $(call settings,%,hits) | $(STAMP)
	rm -rf $(@D)
	$(PY) preprocess.py toy --particle $(call part,$*) --eta $(call eta,$*) --events-per-energy $(EVENTS) --seed $$(( $(SEED) + 1000 )) --out $(@D)
	touch $@
$(WORK)/%/voxels.h5: $(WORK)/%/hits/.done preprocess.py $(SHARED) $(call binning,%)
	$(PY) preprocess.py voxelise --binning $(call binning,$*) --particle $(call part,$*) --out $@ $(WORK)/$*/hits/hits_*.h5
$(WORK)/%/voxels_heldout.h5: $(WORK)/%/hits_heldout/.done preprocess.py $(SHARED) $(call binning,%)
	$(PY) preprocess.py voxelise --binning $(call binning,$*) --particle $(call part,$*) --out $@ $(WORK)/$*/hits_heldout/hits_*.h5
else
# CaloChallenge files: verified download (or a clear message naming the files and the record to fetch by hand)
data: $(addprefix $(DATA_DIR)/,$(CC_FILES))
$(addprefix $(DATA_DIR)/,$(CC_FILES)): | $(STAMP)
	$(PY) preprocess.py fetch --dataset $(DATASET) --dir $(DATA_DIR)
$(WORK)/%/voxels.h5: $(DATA_DIR)/$(word 1,$(CC_FILES))
	mkdir -p $(@D) && ln -sf $(abspath $<) $@
$(WORK)/%/voxels_heldout.h5: $(DATA_DIR)/$(word 2,$(CC_FILES))
	mkdir -p $(@D) && ln -sf $(abspath $<) $@
endif

$(WORK)/%/train.h5: $(WORK)/%/voxels.h5 preprocess.py $(SHARED) $(call settings,%,prepare)
	$(PY) preprocess.py prepare --binning $(call binning,$*) --particle $(call part,$*) --range $(RANGE) --out $@ $<

# --resume continues a killed run; a run whose settings changed starts afresh (its stamp is kept inside it)
$(WORK)/%/run/.done: $(WORK)/%/train.h5 train.py $(SHARED) $(call settings,%,train)
	cmp -s $(call settings,$*,train) $(@D)/make-settings 2>/dev/null || { rm -rf $(@D) && mkdir -p $(@D) && cp $(call settings,$*,train) $(@D)/make-settings; }
	$(PY) train.py --data $< --out $(@D) --iterations $(ITERATIONS) --checkpoint-every $(CKPT_EVERY) --seed $(SEED) --resume $(TRAIN_ARGS)
	touch $@

# the epoch is chosen on the training sample; generated.h5 mirrors the held-out sample for evaluate.py
$(RESULTS)/%/select/best.json: $(WORK)/%/run/.done $(WORK)/%/voxels_heldout.h5 select_epoch.py $(SHARED) $(call settings,%,select)
	$(PY) select_epoch.py --run $(WORK)/$*/run --reference $(WORK)/$*/voxels.h5 --events $(SELECT_EVENTS) \
	    --generate-like $(WORK)/$*/voxels_heldout.h5 --seed $(SEED) --out $(@D) $(SELECT_ARGS)

# export: the lwtnn graph JSON and the ONNX model of the best checkpoint (same stem) plus their meta JSON, each
# checked against Keras before anything is written; .done stands for all three files
$(RESULTS)/%/lwtnn/.done: $(RESULTS)/%/select/best.json export_lwtnn.py $(SHARED) $(call settings,%,export)
	$(PY) export_lwtnn.py --run $(WORK)/$*/run --best $< --out $(@D) --format both --check $(EXPORT_ARGS)
	touch $@

$(RESULTS)/%/eval/metrics.json: $(RESULTS)/%/select/best.json $(WORK)/%/voxels_heldout.h5 evaluate.py $(SHARED) $(call settings,%,eval)
	$(PY) evaluate.py -i $(RESULTS)/$*/select/generated.h5 -r $(WORK)/$*/voxels_heldout.h5 -m all -d $(call evalds,$*) \
	    --output_dir $(@D) --seed $(SEED) --cls_n_epochs $(CLS_EPOCHS) --json $@ $(EVAL_ARGS)

# --- summary across every slice: reads each slice's select/, eval/, lwtnn/ and held-out reference
SLICE_RESULTS := $(foreach s,$(SLICES),$(RESULTS)/$(s)/select/best.json $(RESULTS)/$(s)/eval/metrics.json \
    $(RESULTS)/$(s)/lwtnn/.done $(WORK)/$(s)/voxels_heldout.h5)
summary: $(RESULTS)/summary/summary.json
$(RESULTS)/summary/summary.json: summary.py $(SHARED) $(SLICE_RESULTS) $(SUMMARY_STAMP) | $(STAMP)
	$(PY) summary.py --results $(RESULTS) --slices "$(SLICES)" --out $(@D) $(SUMMARY_ARGS)
# whatever is there now (a cluster's last node, or a look while slices train); never builds a slice
summary-now: summary.py $(SHARED) | $(STAMP)
	$(PY) summary.py --results $(RESULTS) --slices "$(SLICES)" --out $(RESULTS)/summary $(SUMMARY_ARGS)

# --- baseline: the same chain with a generator trained for 1 iteration, to show what training buys
baseline: $(foreach s,$(SLICES),$(RESULTS)/$(s)/baseline/eval/metrics.json)
$(RESULTS)/%/baseline/eval/metrics.json: $(WORK)/%/train.h5 $(WORK)/%/voxels_heldout.h5 train.py select_epoch.py evaluate.py     $(SHARED) $(call settings,%,train) $(call settings,%,select) $(call settings,%,eval) | $(STAMP)
	rm -rf $(WORK)/$*/run_untrained
	$(PY) train.py --data $< --out $(WORK)/$*/run_untrained --iterations 1 --checkpoint-every 1 --seed $(SEED) --resume $(TRAIN_ARGS)
	$(PY) select_epoch.py --run $(WORK)/$*/run_untrained --reference $(WORK)/$*/voxels.h5 --events $(SELECT_EVENTS) \
	    --generate-like $(WORK)/$*/voxels_heldout.h5 --seed $(SEED) --out $(RESULTS)/$*/baseline/select $(SELECT_ARGS)
	$(PY) evaluate.py -i $(RESULTS)/$*/baseline/select/generated.h5 -r $(WORK)/$*/voxels_heldout.h5 -m all \
	    -d $(call evalds,$*) --output_dir $(@D) --seed $(SEED) --cls_n_epochs $(CLS_EPOCHS) --json $@ $(EVAL_ARGS)

# --- scale-out: the same per-slice targets, run by HTCondor DAGMan or a Slurm job array -------------
condor: | $(STAMP)
	$(PY) scaleout.py condor --slices "$(SLICES)" --work $(WORK) --results $(RESULTS) --out condor/$(DATASET) \
	    -- $(MAKEFLAGS_FOR_JOBS)
slurm: | $(STAMP)
	$(PY) scaleout.py slurm --slices "$(SLICES)" --work $(WORK) --results $(RESULTS) --out slurm/$(DATASET) -- $(MAKEFLAGS_FOR_JOBS)
MAKEFLAGS_FOR_JOBS = DATASET=$(DATASET) PARTICLES="$(PARTICLES)" ETAS="$(strip $(ETAS))" ITERATIONS=$(ITERATIONS) CKPT_EVERY=$(CKPT_EVERY) RANGE=$(RANGE) \
    EVENTS=$(EVENTS) SELECT_EVENTS=$(SELECT_EVENTS) CLS_EPOCHS=$(CLS_EPOCHS) SEED=$(SEED) DATA_DIR=$(DATA_DIR) \
    TRAIN_ARGS="$(TRAIN_ARGS)" SELECT_ARGS="$(SELECT_ARGS)" EXPORT_ARGS="$(EXPORT_ARGS)" EVAL_ARGS="$(EVAL_ARGS)" \
    SUMMARY_ARGS="$(SUMMARY_ARGS)"

clean:
	rm -rf $(WORK) $(RESULTS)

# the toy hits (~0.8 GB per slice at EVENTS=1000) once the voxel files exist; Make does not redo anything for them
clean-hits:
	rm -rf $(foreach s,$(SLICES),$(WORK)/$(s)/hits $(WORK)/$(s)/hits_heldout)

# one slice only: make clean-slice SLICE=photon_0.20 (its intermediate files and its results)
clean-slice:
	@test -n "$(SLICE)" || { echo "usage: make clean-slice SLICE=<particle>_<eta>, e.g. SLICE=photon_0.20" >&2; exit 2; }
	rm -rf $(WORK)/$(SLICE) $(RESULTS)/$(SLICE)

clean-venv:
	rm -rf $(VENV)
