"""train.py -- one conditional Wasserstein GAN with gradient penalty per training file (FastCaloGAN V2).

Reads a training file written by ``preprocess.py prepare`` (voxels = showers / E_kin, condition label per
event) and trains the FastCaloGAN V2 network pair with Keras 3 on whatever backend ``KERAS_BACKEND`` names
(TensorFlow by default, on CPU; ``KERAS_BACKEND=jax`` on a GPU):

* generator: input [noise (latent_dim values drawn from N(0.5, 0.5)), condition [label, 0]] concatenated,
  hidden Dense 50, 100, 200 and a Dense(N_vox) output in FastCaloGAN's three forms (He-uniform kernels, zero
  biases; see :func:`build_generator`), picked by the binning XML's energy range or by particle and range;
  batch-norm runs in inference mode during training by default, as FastCaloGAN's code trained it
  (:func:`batchnorm_training`);
* or, for a training file of CaloShowerGAN's layer representation (``preprocess.py prepare --norm layer``;
  ``--recipe caloshowergan`` needs one), the same body with CaloShowerGAN's heads (:func:`build_layer_generator`);
  the critic then sees the representation, E_tot / E_kin included, and ``plumbing.generate`` multiplies the heads
  back into voxel / E_kin;
* critic: input [voxels, condition] concatenated, Dense layers of the XML's ``discriminator`` sizes or three of
  N_vox with ReLU, linear output (width capped at CRITIC_WIDTH_CAP = 2048 by default, so that CaloChallenge
  datasets 2 and 3 fit; ``--critic-width``); on request it also sees inputs of its own, each standardised over the
  training sample and scaled to a chosen spread, which the gradient penalty counts as coordinates of their own:
  E_tot / E_kin (``--critic-etot``), the layer energies (``--critic-summaries``) and each layer's soft fraction of
  voxels above the readout threshold (``--critic-sparsity``); the generator, and so what FastCaloSim runs, is
  unchanged by them, as by ``--relu-gradient-leak`` (:func:`leaky_gradient_relu`, the output ReLU's gradient only);
* WGAN-GP: 5 critic steps per generator step, lambda 10, Adam (lr 1e-4, beta1 0.55), batch 128 -- or the XML's
  settings (particle < region < range; command-line flags above all; config.json says where each came from).
  Strategy ``all`` (every energy from the start) or ``sequential`` (:func:`sequential_exponents`).

One training iteration (5 critic updates and 1 generator update) is one compiled function: the batches for
all 5 critic steps are drawn at once (numpy ``Generator``, seeded, its state saved in every checkpoint; the
generator step takes the conditions of the last one), the critic sees real and fake events in one forward
pass, and with TensorFlow the whole iteration is XLA-compiled.

Outputs in RUN_DIR (the layout select_epoch.py and export_lwtnn.py read):
  config.json            everything needed to rebuild and interpret the networks
  ckpt_<iteration>/      generator.keras (inputs "noise", "condition"; output normalised voxels), state.json,
                         resume/ (generator + critic weights, optimiser state; kept for the newest checkpoints)
  losses.csv             one row per iteration: critic loss, generator loss, gradient penalty, Wasserstein
                         estimate (critic numbers are the mean over the critic steps of that iteration)
A checkpoint directory appears only when complete (written under a temporary name, then renamed); losses
are appended at each checkpoint, and ``--resume`` trims rows newer than the checkpoint it restarts from, so
a killed and resumed run has exactly one row per iteration and ends at the same iteration count.

Usage:
    python train.py --data train_photon_eta_20_25_high.h5 --out runs/photon_20_25_high \
        --iterations 1000000 --checkpoint-every 1000 --seed 1 [--resume] [--exclude-energy 65536]

Python use of a finished run (what select_epoch.py and export_lwtnn.py do, through plumbing.py):
    >>> import numpy as np, plumbing                                   # doctest: +SKIP
    >>> g = plumbing.load_generator("runs/photon_20_25_high")        # doctest: +SKIP
    >>> x = plumbing.generate(g, np.full(1000, 0.5), 1)              # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time

import numpy as np

from HighLevelFeatures import PARTICLES, read_geometry
from plumbing import (FASTCALOGAN_RANGES, LAYER_HEAD, LAYER_OUTPUT, NOISE_MEAN, NOISE_STD, HelpFormatter, UserError,
                      atomic_directory, atomic_output, check_spans, condition_vector, ensure_dir, import_keras,
                      kinetic_energy, layer_representation_size, open_h5, read_run_config, run_cli, write_json)
from plumbing import list_checkpoints as plumbing_list_checkpoints

# ----------------------------------------------------------------------------------------------
# configuration

GENERATOR_HIDDEN = (50, 100, 200)
DEFAULT_ITERATIONS = 1_000_000           # FastCaloGAN trained up to 1M generator iterations
TRAINING_ATTRS = ("particle", "pid", "eta_min", "eta_max", "range", "binning", "label_scheme", "max_exp",
                  "p_min", "p_max", "ekin_min", "ekin_max", "latent_dim", "n_voxels", "source")
LOSS_COLUMNS = ("iteration", "critic_loss", "generator_loss", "gradient_penalty", "wasserstein")
#: the critic's hidden layers are N_vox wide (FastCaloGAN, a few hundred voxels); CaloChallenge dataset 3
#: (40500 voxels) would need 5e9 weights, so the default width stops here (dataset 2: 6480 -> 2048)
CRITIC_WIDTH_CAP = 2048
EXCLUDE_RTOL = 1e-3                      # relative tolerance when matching --exclude-energy to E_inc

#: named sets of settings (``--recipe``); each option is what the flag of the same name would set, and a flag
#: given on the command line overrides it. ``fastcalogan`` takes everything from the binning XML and
#: FastCaloGAN's defaults.
RECIPES = {
    "fastcalogan": {
        "description": "FastCaloGAN's own settings (binning XML, else lr 1e-4, beta1 0.55, 5 critic steps, "
                       "batch 128, constant lr, critic on the voxels alone)",
        "options": {}},
    "calokit": {
        "description": "more learnt per CPU-minute: FastCaloGAN's networks started from Glorot-uniform instead "
                       "of He-uniform kernels, 2 critic steps per generator step at lr 2e-4 (about twice the "
                       "generator updates per CPU-second, each twice as large)",
        "options": {"n_critic": 2, "lr": 2e-4, "init": "glorot"}},
    "calokit-etot": {
        "description": "calokit, and the critic also sees E_tot / E_kin as an input coordinate of its own at "
                       "spread 0.2 (--critic-etot 0.2): the generator, and so what FastCaloSim runs, is unchanged",
        "options": {"n_critic": 2, "lr": 2e-4, "init": "glorot", "critic_etot": 0.2}},
    "calokit-etot-leak": {
        "description": "calokit-etot, and in training the output ReLU's gradient leaks 0.1 below zero "
                       "(--relu-gradient-leak 0.1: no voxel stays switched off for good; the network is the same "
                       "ReLU network) with the learning rate decaying as a cosine to 0.1x over the run "
                       "(--lr-decay 0.1)",
        "options": {"n_critic": 2, "lr": 2e-4, "init": "glorot", "critic_etot": 0.2, "relu_gradient_leak": 0.1,
                    "lr_decay": 0.1}},
    "caloshowergan": {
        "description": "CaloShowerGAN's (FastCaloGAN's successor, same authors; its public training code): the "
                       "layer representation (a training file of preprocess.py prepare --norm layer) learnt by "
                       "FastCaloGAN's swish body with softmax heads per layer, a layer-fraction head and an "
                       "E_tot/E_kin head; Adam lr 1e-4, beta1 0.5, batch 1024, latent 50; e/gamma 8 critic steps "
                       "with gradient-penalty weight 3, pions and protons 5 and 10",
        "norm": "layer",
        "options": {"lr": 1e-4, "beta1": 0.5, "batch_size": 1024, "latent_dim": 50,
                    "activation": "swish", "batchnorm": True, "generator_layers": [50, 100, 200]},
        "by_particle": {("photon", "electron"): {"n_critic": 8, "lambda_gp": 3.0},
                        ("pion", "proton"): {"n_critic": 5, "lambda_gp": 10.0}},
        "origin": {
            "lr": "CaloShowerGAN training code: Adam learning rate 1e-4",
            "beta1": "CaloShowerGAN training code: Adam beta1 0.5",
            "batch_size": "CaloShowerGAN training code: batch 1024",
            "latent_dim": "CaloShowerGAN training code: latent 50 ~ N(0.5, 0.5)",
            "activation": "CaloShowerGAN training code: BNswishCust generators (Dense -> BatchNorm -> swish body)",
            "batchnorm": "CaloShowerGAN training code: BNswishCust generators (Dense -> BatchNorm -> swish body)",
            "generator_layers": "CaloShowerGAN training code: body widths [50, 100, 200] x G_size 1",
            "n_critic": "CaloShowerGAN training code: photons 8, pions 5 critic steps per generator step",
            "lambda_gp": "CaloShowerGAN training code: photons gradient-penalty weight 3, pions 10",
        }},
}


def recipe_options(name, particle):
    """{option: (value, where it came from)} of recipe ``name`` for ``particle``: the recipe's options, then
    those of its particle group (``by_particle``: e/gamma and hadrons may differ).

    >>> recipe_options("caloshowergan", "pion")["n_critic"]
    (5, 'recipe caloshowergan: CaloShowerGAN training code: photons 8, pions 5 critic steps per generator step')
    >>> recipe_options("calokit", "photon")["lr"]
    (0.0002, 'recipe calokit')
    """
    recipe = RECIPES[name]
    opts = dict(recipe["options"])
    for particles, extra in recipe.get("by_particle", {}).items():
        if particle in particles:
            opts.update(extra)
    origin = recipe.get("origin", {})
    return {k: (v, f"recipe {name}" + (f": {origin[k]}" if k in origin else "")) for k, v in opts.items()}


def training_norm(attrs):
    """What a training file holds for the network to learn: ``ekin`` (voxels / E_kin) or ``layer``."""
    return str(attrs.get("norm", "ekin"))


def check_recipe_norm(recipe, attrs, path):
    """UserError (one line) if ``recipe`` needs a training-file representation that ``path`` does not hold
    (a recipe without ``norm`` trains on either: the generator follows the file)."""
    need, have = RECIPES[recipe].get("norm"), training_norm(attrs)
    if need is not None and need != have:
        what = {"ekin": "voxels / E_kin", "layer": "the layer representation"}
        raise UserError(f"{path}: --recipe {recipe} trains on {what.get(need, need)} but this file holds "
                        f"{what.get(have, have)}; prepare it with preprocess.py prepare --norm {need}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="training file of preprocess.py prepare (train_*.h5)")
    p.add_argument("--out", required=True, help="run directory (config.json, ckpt_<iteration>/, losses.csv)")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="generator iterations in total")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between checkpoints")
    p.add_argument("--seed", type=int, default=1, help="seed of weights, batches and noise")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint of --out (starts afresh if there is none)")
    p.add_argument("--exclude-energy", type=float, nargs="+", action="extend", default=[], metavar="E",
                   help="leave out events with this incident energy in MeV (relative tolerance 1e-3)")
    p.add_argument("--binning", default=None,
                   help="FastCaloGAN binning XML whose particle / region / energy-range settings (latentDim, "
                        "generator, discriminator, learningRate, batchSize, lambda, gdratio, beta, "
                        "activationFunction, useBatchNormalisation) are used when no flag gives them "
                        "(default: the training file's binning, when that file exists)")
    p.add_argument("--recipe", default="fastcalogan", choices=sorted(RECIPES),
                   help="named set of training settings (config.json records it): "
                        + "; ".join(f"{k} = {v['description']}" for k, v in sorted(RECIPES.items()))
                        + ". Flags given on the command line override the recipe's values")
    p.add_argument("--critic-summaries", default=None, action=argparse.BooleanOptionalAction,
                   help="the critic also sees E_tot / E_kin and each layer's E_layer / E_kin, standardised over "
                        "the training sample; the generator is unchanged (recipe's choice, else off as in "
                        "FastCaloGAN)")
    p.add_argument("--critic-etot", type=float, default=None, metavar="SPREAD",
                   help="the critic also sees E_tot / E_kin (the sum of the normalised voxels), standardised over "
                        "the training sample and scaled to this spread (0 = off; recipe's choice, else off as in "
                        "FastCaloGAN). With --critic-summaries the layer energies get the same spread")
    p.add_argument("--critic-sparsity", type=float, default=None, metavar="SPREAD",
                   help="the critic also sees, per layer, the fraction of voxels at or above the readout threshold "
                        "(--critic-threshold, in MeV: voxel / E_kin x E_kin), made smooth by a sigmoid, "
                        "standardised over the training sample and scaled to this spread (0 = off; recipe's "
                        "choice, else off as in FastCaloGAN); the generator is unchanged. Measured harmful at "
                        "spreads 0.05 and 0.2 (the count's gradient scales with E_kin; docs/recipes-and-quality.md)")
    p.add_argument("--critic-threshold", type=float, default=None, metavar="MEV",
                   help="the readout threshold --critic-sparsity counts voxels against (default 1 MeV: "
                        "CaloChallenge dataset 1's and evaluate.py's)")
    p.add_argument("--relu-gradient-leak", type=float, default=None, metavar="SLOPE",
                   help="in training, the output ReLU passes this gradient slope where it is zero, so that voxels "
                        "the generator has switched off for every input can come back; its values stay those of the "
                        "ReLU, so the saved and exported network is unchanged (0 = off; recipe's choice, else off "
                        "as in FastCaloGAN)")
    p.add_argument("--lr-decay", type=float, default=None, metavar="F",
                   help="cosine learning-rate decay from --lr to F x --lr over --iterations (1 = constant: "
                        "FastCaloGAN; recipe's choice, else 1)")
    p.add_argument("--init", default=None, choices=["he", "glorot"],
                   help="kernel initialisation of both networks: he = He-uniform, zero biases (FastCaloGAN); glorot "
                        "= Keras' Glorot-uniform (recipe's choice, else he)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (XML batchSize, else 128)")
    p.add_argument("--n-critic", type=int, default=None,
                   help="critic updates per generator update (XML gdratio, else 5)")
    p.add_argument("--lambda-gp", type=float, default=None, help="gradient-penalty weight (XML lambda, else 10)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate, both networks (XML learningRate, else 1e-4)")
    p.add_argument("--beta1", type=float, default=None, help="Adam beta1 (XML beta, else 0.55)")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 (both networks)")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="noise values per shower (XML latentDim, else the training file's latent_dim)")
    p.add_argument("--generator-layers", default=None, metavar="N,N,N",
                   help="generator hidden layer sizes (XML generator, else 50,100,200)")
    p.add_argument("--activation", default=None,
                   help="generator hidden activation (XML activationFunction; else ReLU for the e/gamma low "
                        "range and for pions/protons, swish for the other e/gamma ranges)")
    p.add_argument("--output-activation", default=None, choices=["relu", "swish", "sigmoid", "linear"],
                   help="generator output activation. swish with batch-norm: FastCaloGAN's swish network "
                        "(Dense -> BatchNorm -> swish; voxels may be negative, which evaluate.py sets to zero as "
                        "CaloChallenge's does); the default when the XML's energy range or a FastCaloGAN range name "
                        "(High12, All, ...) selects that network, relu (non-negative) otherwise")
    p.add_argument("--batchnorm", default=None, action=argparse.BooleanOptionalAction,
                   help="batch-norm in the generator (XML useBatchNormalisation; else on for e/gamma, off for "
                        "pions/protons); the swish network also normalises its output layer")
    p.add_argument("--batchnorm-mode", default=None, choices=["inference", "batch-stats"],
                   help="how batch-norm runs in the training steps: inference = as FastCaloGAN trained (moving "
                        "mean 0 / variance 1 kept, a learnt scale and shift; training, generation and export "
                        "agree), batch-stats = normalised by the batch's statistics, moving averages for "
                        "generation (default: inference)")
    p.add_argument("--batches", default="replacement", choices=["replacement", "epoch"],
                   help="how real showers are drawn: replacement = uniformly with replacement at every step; "
                        "epoch = FastCaloGAN's (BoloGAN): epochs of the shuffled events, each event once per "
                        "epoch, batches taken in turn across epoch ends (a new shuffle when the sequential "
                        "strategy adds a momentum)")
    p.add_argument("--strategy", default="all", choices=["all", "sequential"],
                   help="all: every energy from the start; sequential (FastCaloGAN): the middle momentum first, "
                        "then one more momentum every --add-every iterations, alternately above and below")
    p.add_argument("--first-sample-iterations", type=int, default=50_000,
                   help="sequential: iterations on the middle momentum alone")
    p.add_argument("--add-every", type=int, default=20_000, help="sequential: iterations between added momenta")
    p.add_argument("--critic-width", type=int, default=None,
                   help=f"units of each of the critic's 3 hidden layers (default: N_vox as FastCaloGAN, at most "
                        f"{CRITIC_WIDTH_CAP} so CaloChallenge datasets 2/3 fit in memory)")
    p.add_argument("--keep-resume", type=int, default=1,
                   help="newest checkpoints that keep their resume state (critic, optimisers); older ones keep "
                        "generator.keras and state.json only")
    p.add_argument("--jit", default=True, action=argparse.BooleanOptionalAction,
                   help="XLA-compile the training iteration (TensorFlow backend)")
    p.add_argument("--deterministic", default=True, action=argparse.BooleanOptionalAction,
                   help="TensorFlow op determinism (same seed -> same losses)")
    args = p.parse_args(argv)
    for name in ("iterations", "checkpoint_every", "batch_size", "n_critic", "keep_resume", "critic_width",
                 "latent_dim", "first_sample_iterations", "add_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    check_hyper(args.lr, args.lambda_gp, args.beta1, args.beta2, "--lr must be > 0, --lambda-gp >= 0 and "
                "--beta1/--beta2 in [0, 1)")
    if args.critic_etot is not None and not (math.isfinite(args.critic_etot) and args.critic_etot >= 0):
        raise UserError(f"--critic-etot must be a spread >= 0 (got {args.critic_etot})")
    if args.critic_sparsity is not None and not (math.isfinite(args.critic_sparsity) and args.critic_sparsity >= 0):
        raise UserError(f"--critic-sparsity must be a spread >= 0 (got {args.critic_sparsity})")
    if args.critic_threshold is not None and not (math.isfinite(args.critic_threshold) and args.critic_threshold > 0):
        raise UserError(f"--critic-threshold must be > 0 MeV (got {args.critic_threshold})")
    if args.relu_gradient_leak is not None and not 0 <= args.relu_gradient_leak <= 1:
        raise UserError(f"--relu-gradient-leak must be a slope in [0, 1] (got {args.relu_gradient_leak})")
    if args.lr_decay is not None and not 0 < args.lr_decay <= 1:
        raise UserError(f"--lr-decay must be in (0, 1] (got {args.lr_decay})")
    if args.generator_layers is not None:
        args.generator_layers = parse_layers(args.generator_layers, "--generator-layers")
    return args


def check_hyper(lr, lambda_gp, beta1, beta2, message):
    """UserError(message) unless lr > 0, lambda_gp >= 0 and beta1, beta2 in [0, 1) (None = not given)."""
    ok = ((lr is None or lr > 0) and (lambda_gp is None or lambda_gp >= 0)
          and all(b is None or 0 <= b < 1 for b in (beta1, beta2)))
    if not ok:
        raise UserError(message)


def parse_layers(raw, what):
    """"50,100,200" -> [50, 100, 200]; UserError naming ``what`` otherwise."""
    try:
        sizes = [int(v) for v in str(raw).split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"{what} {raw!r}: expected comma-separated positive layer sizes")
    return sizes


def _keras():
    """Import Keras lazily (keeps ``--help`` fast) with TensorFlow's start-up chatter silenced."""
    return import_keras()


def _backend():
    return _keras().backend.backend()


def _jsonable(value):
    """h5py attribute values (numpy scalars, bytes, arrays) -> JSON-friendly Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------
# training data

def load_training_file(path):
    """Read and validate a training file; returns dict(voxels (N,V) float32, label (N,), einc (N,), attrs).

    ``voxels`` is what the network learns: the file's ``voxels`` (voxel / E_kin), or, in a file prepared with
    ``--norm layer``, its ``representation`` (N, V + L + 1; CaloShowerGAN's layer representation).
    Any problem is a :class:`UserError` naming the file and the field.
    """
    import h5py

    with open_h5(path, "training file") as f:
        for name in ("voxels", "label", "incident_energies"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise UserError(f"{path}: missing dataset '{name}' (training files of preprocess.py prepare "
                                f"have 'voxels', 'label', 'incident_energies', 'e_kin')")
        vox, lab, einc = f["voxels"], f["label"], f["incident_energies"]
        if vox.ndim != 2 or vox.shape[0] == 0 or vox.shape[1] == 0:
            raise UserError(f"{path}: 'voxels' has shape {vox.shape}, expected (events > 0, voxels > 0)")
        n = vox.shape[0]
        if lab.shape not in ((n,), (n, 1)):
            raise UserError(f"{path}: 'label' has shape {lab.shape}, expected ({n},)")
        if einc.shape not in ((n,), (n, 1)):
            raise UserError(f"{path}: 'incident_energies' has shape {einc.shape}, expected ({n}, 1)")
        attrs = {k: _jsonable(v) for k, v in f.attrs.items()}
        if "n_voxels" in attrs and int(attrs["n_voxels"]) != vox.shape[1]:
            raise UserError(f"{path}: attribute n_voxels={attrs['n_voxels']} but 'voxels' has {vox.shape[1]} columns")
        attrs.setdefault("n_voxels", vox.shape[1])
        feat = _features_dataset(f, path, attrs, n)
        try:
            voxels = np.asarray(f[feat][...], dtype=np.float32)
            label = np.asarray(lab[...], dtype=np.float32).reshape(-1)
            energies = np.asarray(einc[...], dtype=np.float64).reshape(-1)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{path}: cannot read the datasets ({err})") from None
    for name, arr in ((feat, voxels), ("label", label), ("incident_energies", energies)):
        if not np.all(np.isfinite(arr)):
            raise UserError(f"{path}: '{name}' has NaN/inf values")
    if (voxels < 0).any():
        raise UserError(f"{path}: '{feat}' has negative values")
    if "particle" not in attrs:
        raise UserError(f"{path}: missing attribute 'particle'")
    if attrs["particle"] not in PARTICLES:
        raise UserError(f"{path}: attribute particle={attrs['particle']!r} is not one of {', '.join(PARTICLES)}")
    attrs.setdefault("latent_dim", 50)
    if int(attrs["latent_dim"]) < 1:
        raise UserError(f"{path}: attribute latent_dim={attrs['latent_dim']} must be >= 1")
    return {"voxels": voxels, "label": label, "einc": energies, "attrs": attrs}


def _features_dataset(f, path, attrs, n):
    """Name of the dataset the network learns (``voxels`` or ``representation``), its layout checked."""
    norm = training_norm(attrs)
    if norm == "ekin":
        return "voxels"
    if norm != "layer":
        raise UserError(f"{path}: attribute norm={norm!r} is neither 'ekin' nor 'layer'")
    if "representation" not in f or "layer_spans" not in attrs:
        raise UserError(f"{path}: norm='layer' but no 'representation' dataset / 'layer_spans' attribute "
                        f"(write it with preprocess.py prepare --norm layer)")
    try:
        spans = check_spans(attrs["layer_spans"], attrs["n_voxels"])
    except (UserError, TypeError, ValueError) as err:
        raise UserError(f"{path}: attribute layer_spans: {err}") from None
    want = (n, layer_representation_size(spans))
    if tuple(f["representation"].shape) != want:
        raise UserError(f"{path}: 'representation' has shape {f['representation'].shape}, expected {want}")
    attrs["layer_spans"] = [list(sp) for sp in spans]
    return "representation"


def energy_mask(einc, energies, rtol=EXCLUDE_RTOL):
    """Boolean mask of events whose incident energy matches one of ``energies`` (relative tolerance)."""
    einc = np.asarray(einc, dtype=np.float64)
    mask = np.zeros(einc.shape, dtype=bool)
    for e in energies:
        mask |= np.abs(einc - e) <= rtol * abs(e)
    return mask


def select_training_events(data, exclude, path="training file"):
    """Drop the events of the excluded energies; returns (voxels, label, n_dropped per energy)."""
    dropped = {}
    keep = np.ones(data["einc"].shape, dtype=bool)
    for e in exclude:
        if not (e > 0 and math.isfinite(e)):
            raise UserError(f"--exclude-energy {e}: must be a positive energy in MeV")
        m = energy_mask(data["einc"], [e])
        if not m.any():
            have = ", ".join(f"{x:g}" for x in np.unique(data["einc"])[:20])
            raise UserError(f"{path}: no events with incident energy {e:g} MeV to exclude (energies: {have})")
        dropped[e] = int(m.sum())
        keep &= ~m
    if not keep.any():
        raise UserError(f"{path}: --exclude-energy leaves no events to train on")
    return data["voxels"][keep], data["label"][keep], dropped, data["einc"][keep]


def sequential_exponents(iteration, exp_min, exp_max, first=50_000, every=20_000):
    """(lowest, highest) momentum exponent trained at ``iteration`` (1-based) by FastCaloGAN's sequential strategy.

    Iterations 1..first train the middle exponent int((exp_min + exp_max) / 2) alone; at iteration
    first + 1 and every ``every`` iterations after it, one more exponent joins, alternately the next one above
    and the next one below (a side that has reached its end is skipped, its turn passes).

    >>> [sequential_exponents(i, 6, 12, 5, 2) for i in (1, 5, 6, 8, 10, 12, 14, 16)]
    [(9, 9), (9, 9), (9, 10), (8, 10), (8, 11), (7, 11), (7, 12), (6, 12)]
    """
    lo = hi = (int(exp_min) + int(exp_max)) // 2
    done = iteration - 1 - first          # FastCaloGAN counts iterations from 0: a step at first, first + every, ...
    if done < 0:
        return lo, hi
    up = True
    for _ in range(done // every + 1):
        if up and hi < exp_max:
            hi, up = hi + 1, False
        elif not up and lo > exp_min:
            lo, up = lo - 1, True
    return lo, hi


def momentum_exponents(p):
    """Nearest integer k with p ~ 2^k MeV (FastCaloGAN's samples are at p = 2^k)."""
    return np.rint(np.log2(np.asarray(p, dtype=np.float64))).astype(np.int64)


class SequentialPool:
    """Event indices the sequential strategy draws from at each iteration (rebuilt when the range grows)."""

    def __init__(self, einc, cfg):
        st = cfg["strategy"]
        self.exps = momentum_exponents(einc)
        self.lo, self.hi = int(momentum_exponents(cfg["p_min"])), int(momentum_exponents(cfg["p_max"]))
        self.first, self.every = int(st["first_sample_iterations"]), int(st["add_every"])
        self.range, self.pool = None, None

    def __call__(self, iteration):
        rng = sequential_exponents(iteration, self.lo, self.hi, self.first, self.every)
        if rng != self.range:
            self.range = rng
            self.pool = np.flatnonzero((self.exps >= rng[0]) & (self.exps <= rng[1]))
            if self.pool.size == 0:
                raise UserError(f"sequential strategy: no training events with momentum 2^{rng[0]}..2^{rng[1]} MeV "
                                f"(the middle of the range) to start from; use --strategy all")
        return self.pool


# ----------------------------------------------------------------------------------------------
# networks

def _dense(layers, units, name, activation=None, he=True):
    """A Dense layer; FastCaloGAN's initialisation (He-uniform kernel, zero bias) unless ``he`` is False."""
    kw = {"kernel_initializer": "he_uniform", "bias_initializer": "zeros"} if he else {}
    return layers.Dense(int(units), activation=activation, name=name, **kw)


def _activation_layer(layers, activation, batchnorm, name):
    """FastCaloGAN's activation layers: ReLU after batch-norm is ``LeakyReLU(0)``, anything else ``Activation``."""
    if activation == "relu" and batchnorm:
        return layers.LeakyReLU(negative_slope=0.0, name=name)
    return layers.Activation(activation, name=name)


def build_generator(n_voxels, latent_dim=50, cond_dim=2, hidden=GENERATOR_HIDDEN, activation="swish",
                    batchnorm=False, output_activation="relu", output_batchnorm=False, layout="fastcalogan",
                    init="he"):
    """FastCaloGAN generator: [noise, condition] -> (Dense -> [BatchNorm] -> activation) x hidden -> output.

    Inputs are named ``noise`` (latent_dim) and ``condition`` (cond_dim); the last layer is named ``voxels``.
    ``layout="fastcalogan"`` builds the networks of FastCaloGAN's code (He-uniform kernels, zero biases):

    * ReLU with batch-norm: Dense -> BatchNorm -> LeakyReLU(0) per hidden layer, Dense(N_vox) -> LeakyReLU(0);
    * swish (with ``output_batchnorm``): Dense -> BatchNorm -> swish per hidden layer, Dense(N_vox) ->
      BatchNorm -> swish;
    * ReLU without batch-norm: Dense with a fused ReLU on every layer, output included.

    ``layout="legacy"`` rebuilds runs of earlier calokit versions (Keras' default Glorot initialisation,
    Dense -> [BatchNorm] -> Activation, output Dense -> Activation). ``init="glorot"`` builds FastCaloGAN's
    layers with Keras' default Glorot-uniform kernels instead of He-uniform (same network, other start).
    """
    keras = _keras()
    layers = keras.layers
    he = layout != "legacy" and init == "he"
    noise = keras.Input(shape=(int(latent_dim),), name="noise")
    cond = keras.Input(shape=(int(cond_dim),), name="condition")
    h = layers.Concatenate(name="concat")([noise, cond])
    sizes = [int(n) for n in hidden] + [int(n_voxels)]
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        act = output_activation if last else activation
        bn = (output_batchnorm if last else batchnorm)
        suffix = "out" if last else str(i)
        fused = he and act == "relu" and not batchnorm and not bn   # FastCaloGAN's ReLU network without batch-norm
        h = _dense(layers, n, "voxels" if last and fused else f"dense_{suffix}", act if fused else None, he)(h)
        if fused:
            continue
        if bn:
            h = layers.BatchNormalization(name=f"batchnorm_{suffix}")(h)
        name = "voxels" if last else f"activation_{suffix}"
        h = (_activation_layer(layers, act, batchnorm, name) if he else layers.Activation(act, name=name))(h)
    return keras.Model([noise, cond], h, name="generator")


def build_layer_generator(spans, latent_dim=50, cond_dim=2, hidden=GENERATOR_HIDDEN, activation="swish",
                          batchnorm=True, init="he"):
    """CaloShowerGAN's generator of the layer representation: FastCaloGAN's body ([noise, condition] ->
    (Dense -> [BatchNorm] -> activation) x hidden), then heads joined by a Concatenate named
    ``layer_representation``: one Dense(n_voxels_of_layer, softmax) per layer span (``voxel_fractions_<i>``), one
    Dense(n_layers, softmax) (``layer_fractions``), one Dense(1, relu) (``etot_over_ekin``). Output: (N, V + L + 1)
    in :func:`plumbing.to_layer_representation`'s layout; :func:`plumbing.generate` turns it into voxel / E_kin.

    >>> g = build_layer_generator([(0, 3), (3, 5)], latent_dim=4, hidden=(6,))     # doctest: +SKIP
    >>> g.output.shape                                                              # doctest: +SKIP
    (None, 8)
    """
    keras = _keras()
    layers = keras.layers
    spans = check_spans(spans)
    he = init == "he"
    noise = keras.Input(shape=(int(latent_dim),), name="noise")
    cond = keras.Input(shape=(int(cond_dim),), name="condition")
    h = layers.Concatenate(name="concat")([noise, cond])
    for i, n in enumerate(hidden):
        h = _dense(layers, n, f"dense_{i}", None, he)(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"batchnorm_{i}")(h)
        h = _activation_layer(layers, activation, batchnorm, f"activation_{i}")(h)
    heads = [_dense(layers, b - a, f"{LAYER_HEAD}{i}", "softmax", he)(h) for i, (a, b) in enumerate(spans)]
    heads.append(_dense(layers, len(spans), "layer_fractions", "softmax", he)(h))
    heads.append(_dense(layers, 1, "etot_over_ekin", "relu", he)(h))
    return keras.Model([noise, cond], layers.Concatenate(name=LAYER_OUTPUT)(heads), name="generator")


def build_critic(n_voxels, cond_dim=2, hidden=None, activation="relu", he=True, summaries=None, sparsity=None):
    """FastCaloGAN critic: [voxels, condition] -> Dense(hidden) (ReLU) -> linear score.

    ``hidden`` defaults to [N_vox] x 3; kernels He-uniform and biases zero as FastCaloGAN (``he=False``:
    Keras' defaults, for runs of earlier calokit versions). ``summaries`` (see :func:`summary_settings`) adds
    what a physicist looks at first beside the voxels: the total and the per-layer energies (of the normalised
    voxels, so E_tot / E_kin and E_layer / E_kin), computed by a fixed (non-trainable) linear layer named
    ``summaries`` and standardised with the training sample's mean and standard deviation. The generator, and so
    what FastCaloSim runs, is unchanged. (Standardising them at each energy instead, so that a 1 % resolution
    becomes one unit, made the gradient penalty explode: the penalty bounds the critic's gradient with respect to
    the voxels, and such features multiply it by 1/sigma.) ``sparsity`` (see :func:`sparsity_settings`) adds an
    input ``sparsity``: each layer's soft fraction of voxels above the readout threshold, computed by the step.
    """
    keras = _keras()
    layers = keras.layers
    hidden = (n_voxels,) * 3 if hidden is None else hidden
    x = keras.Input(shape=(int(n_voxels),), name="voxels")
    cond = keras.Input(shape=(int(cond_dim),), name="condition")
    parts = [x, cond]
    inputs = [x, cond]
    if summaries and independent_summaries(summaries):
        s = keras.Input(shape=(len(summaries["mean"]),), name="summaries")
        parts.append(s)
        inputs.append(s)
    elif summaries:
        weights = summary_weights(n_voxels, summaries)
        proj = layers.Dense(weights[0].shape[1], name="summaries", trainable=False)
        parts.append(proj(x))
        proj.set_weights(weights)
    if sparsity:
        s = keras.Input(shape=(len(sparsity["spans"]),), name="sparsity")
        parts.append(s)
        inputs.append(s)
    h = layers.Concatenate(name="concat")(parts)
    for i, n in enumerate(hidden):
        h = _dense(layers, n, f"dense_{i}", activation, he)(h)
    out = _dense(layers, 1, "score", None, he)(h)
    return keras.Model(inputs, out, name="critic")


def independent_summaries(summaries):
    """Whether the critic gets its summaries as an input of their own (``penalty: independent``).

    Then the training step computes them (the same fixed linear map, so the generator's gradient still flows
    through them) and the gradient penalty treats them as coordinates of their own: it bounds
    sqrt(|d score / d voxels|^2 + |d score / d summaries|^2), the critic's slope in a space where one unit of a
    summary is one standardised unit x spread. That is what makes the spread a lever: with the summaries computed
    inside the critic (``penalty: voxels``, runs of ``--critic-summaries``), the penalty bounds the slope along the
    voxels, the summary's path included, and rescaling a summary is undone by the weights after it.
    """
    return bool(summaries) and summaries.get("penalty") == "independent"


def summary_projection(n_voxels, summaries):
    """(kernel, bias) float32 of the critic's independent summaries (:func:`summary_weights`), or None."""
    return tuple(summary_weights(n_voxels, summaries)) if independent_summaries(summaries) else None


def summary_matrix(n_voxels, spans, total_column=None):
    """(n_voxels, 1 + len(spans)) 0/1 matrix: column 0 sums every voxel (or, with ``total_column``, takes that
    input alone: E_tot / E_kin of the layer representation), column 1 + i the voxels of span i.

    >>> summary_matrix(5, [(0, 2), (2, 5)]).T.tolist()
    [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]]
    >>> summary_matrix(4, [], total_column=3).T.tolist()
    [[0.0, 0.0, 0.0, 1.0]]
    """
    m = np.zeros((int(n_voxels), 1 + len(spans)), dtype=np.float32)
    if total_column is None:
        m[:, 0] = 1.0
    else:
        m[int(total_column), 0] = 1.0
    for i, (a, b) in enumerate(spans):
        m[int(a):int(b), 1 + i] = 1.0
    return m


def summary_settings(voxels, spans, spread=1.0, total_column=None):
    """The critic's summaries of a training sample: layer spans, each summary's mean and std (float lists) and
    the spread the standardised summaries are scaled to.

    >>> s = summary_settings(np.array([[1.0, 1.0, 2.0], [3.0, 1.0, 0.0]]), [(0, 1), (1, 3)], spread=0.2)
    >>> s["mean"], s["std"], s["spread"]
    ([4.0, 2.0, 2.0], [0.0, 1.0, 1.0], 0.2)
    """
    sums = (np.asarray(voxels, dtype=np.float64)
            @ summary_matrix(voxels.shape[1], spans, total_column).astype(np.float64))
    out = {"spans": [[int(a), int(b)] for a, b in spans], "mean": [float(v) for v in sums.mean(0)],
           "std": [float(v) for v in sums.std(0)], "spread": float(spread)}
    if total_column is not None:
        out["total_column"] = int(total_column)
    return out


def summary_weights(n_voxels, summaries):
    """[kernel, bias] of the fixed layer computing spread x (sums - mean) / std (std floored at 1e-6; runs
    written before the spread existed have spread 1).

    Why a spread: E_tot / E_kin varies by ~1 % around its mean, so as a raw input the critic barely feels it (the
    gradient penalty keeps its slope near one per unit of input); standardised to unit spread it feels nothing
    else (the voxels' shapes are lost). Scaled to a spread of 0.1-0.3 the E_tot resolution is learnt and the
    shapes are kept (bench/bench_quality.py measures it).
    """
    mean = np.asarray(summaries["mean"], dtype=np.float64)
    std = np.maximum(np.asarray(summaries["std"], dtype=np.float64), 1e-6)
    scale = float(summaries.get("spread", 1.0)) / std
    m = summary_matrix(n_voxels, summaries["spans"], summaries.get("total_column")) * scale[None, :]
    return [m.astype(np.float32), (-mean * scale).astype(np.float32)]


def sparsity_settings(voxels, ekin, spans, spread, threshold=1.0, chunk=4096):
    """The critic's per-layer soft counts (:func:`soft_counts`) of a training sample: spans, threshold and width
    in MeV, each count's mean and std over the sample (float lists) and the spread they are scaled to.

    >>> s = sparsity_settings(np.array([[0.0, 0.5], [1.0, 0.0]]), np.array([1.0, 10.0]), [(0, 2)], 0.2)
    >>> round(s["mean"][0], 4), round(s["std"][0], 4), s["width_mev"]     # MeV [0, 0.5] and [10, 0]
    (0.3768, 0.1828, 0.5)
    """
    out = {"spans": [[int(a), int(b)] for a, b in spans], "threshold_mev": float(threshold),
           "width_mev": float(threshold) * SPARSITY_WIDTH, "spread": float(spread)}
    counts = np.concatenate([soft_counts(voxels[i:i + chunk], np.asarray(ekin)[i:i + chunk], out)
                             for i in range(0, len(voxels), chunk)])
    out.update(mean=[float(v) for v in counts.mean(0)], std=[float(v) for v in counts.std(0)])
    return out


#: the sigmoid's width, as a fraction of the threshold: a voxel at the threshold counts 1/2, an empty one
#: sigmoid(-1 / SPARSITY_WIDTH) = 0.12, one at twice the threshold 0.88
SPARSITY_WIDTH = 0.5


def count_matrix(n_voxels, spans):
    """(n_voxels, len(spans)) float64: 1 / (voxels of span i) on span i's rows, so x @ it averages each span.

    >>> count_matrix(3, [(0, 1), (1, 3)]).tolist()
    [[1.0, 0.0], [0.0, 0.5], [0.0, 0.5]]
    """
    m = summary_matrix(n_voxels, spans)[:, 1:].astype(np.float64)       # the 0/1 span columns
    return m / m.sum(axis=0)


def soft_counts(voxels, ekin, sparsity):
    """(N, layers) float64: per layer, the mean over its voxels of sigmoid((voxel / E_kin x E_kin - threshold) /
    width), a differentiable fraction of voxels at or above the readout threshold (numpy; the training step
    computes the same in its backend with :func:`sparsity_projection`'s kernel)."""
    mev = np.asarray(voxels, dtype=np.float64) * np.asarray(ekin, dtype=np.float64).reshape(-1, 1)
    z = (mev - sparsity["threshold_mev"]) / sparsity["width_mev"]
    return (0.5 * (1.0 + np.tanh(0.5 * z))) @ count_matrix(mev.shape[1], sparsity["spans"])


def sparsity_projection(n_voxels, sparsity):
    """(kernel, bias, threshold, width) of the critic's sparsity input, or None without one: the training step
    feeds ``sigmoid((x * E_kin - threshold) / width) @ kernel + bias`` = spread x (counts - mean) / std (std floored
    at 1e-6), an input of the critic's own that the gradient penalty counts as coordinates of their own (as
    :func:`independent_summaries`). The generator's gradient through a count is E_kin / width times the
    sigmoid's slope (up to ~1e7 at 4 TeV), which is why the option, measured, steers training badly."""
    if not sparsity:
        return None
    std = np.maximum(np.asarray(sparsity["std"], dtype=np.float64), 1e-6)
    scale = float(sparsity["spread"]) / std
    kernel = count_matrix(n_voxels, sparsity["spans"]) * scale[None, :]
    bias = -np.asarray(sparsity["mean"], dtype=np.float64) * scale
    return (kernel.astype(np.float32), bias.astype(np.float32), float(sparsity["threshold_mev"]),
            float(sparsity["width_mev"]))


def layer_spans(geom, n_voxels):
    """[(first, last + 1)] voxel index span of each voxelised layer of the slice's Geometry, or [] without one
    (or one of another voxel count): the critic then sums all voxels only."""
    if geom is None or geom.n_voxels != int(n_voxels):
        return []
    return [geom.offsets[lay.id] for lay in geom.layers if lay.n_voxels]


def batchnorm_training(cfg):
    """Whether the training steps run the generator's batch-norm on batch statistics (``batch-stats``).

    ``inference`` (FastCaloGAN: its training steps call the generator without ``training=True``): moving
    mean 0 and variance 1 stay as initialised, batch-norm is a learnt per-unit scale gamma / sqrt(1 + eps)
    and shift beta, the same in training, generation and export. Runs written before the mode existed
    trained on batch statistics.
    """
    return cfg["generator"].get("batchnorm_mode", "batch-stats") == "batch-stats"


def networks_from_config(cfg):
    """(generator, critic) built from a run's config.json dict."""
    g, c = cfg["generator"], cfg["critic"]
    layout, init = g.get("layout", "legacy"), cfg.get("init", "he")
    if layout == "layer_heads":
        gen = build_layer_generator(g["spans"], cfg["latent_dim"], 2, g["hidden"], g["activation"], g["batchnorm"],
                                    init)
    else:
        gen = build_generator(cfg["n_voxels"], cfg["latent_dim"], 2, g["hidden"], g["activation"], g["batchnorm"],
                              g["output_activation"], g.get("output_batchnorm", False), layout, init)
    critic = build_critic(cfg.get("n_features", cfg["n_voxels"]), 2, c["hidden"], c["activation"],
                          he=layout != "legacy" and init == "he", summaries=c.get("summaries"),
                          sparsity=c.get("sparsity"))
    return gen, critic


def learning_rate(cfg):
    """Adam's learning rate: a constant, or with ``lr_decay`` = f < 1 a cosine from lr down to f x lr over the
    ``lr_decay_iterations`` the run was started with (a resumed run keeps its schedule; past its end the rate
    stays at f x lr); the critic's schedule counts its n_critic updates per iteration."""
    keras = _keras()
    decay = float(cfg.get("lr_decay", 1.0))
    if decay >= 1.0:
        return cfg["lr"]
    return keras.optimizers.schedules.CosineDecay(cfg["lr"], max(int(cfg["lr_decay_iterations"]), 1), alpha=decay)


def make_optimizer(cfg, updates_per_iteration=1):
    keras = _keras()
    lr = learning_rate(dict(cfg, lr_decay_iterations=int(cfg.get("lr_decay_iterations", 1)) * updates_per_iteration))
    return keras.optimizers.Adam(learning_rate=lr, beta_1=cfg["beta1"], beta_2=cfg["beta2"])


# ----------------------------------------------------------------------------------------------
# the training iteration (one compiled function per backend)

class EpochBatches:
    """Event indices in epochs without replacement, as FastCaloGAN's input pipeline draws them (BoloGAN
    model/conditional_wgangp.py: the events shuffled anew for every pass, passes repeated and cut into batches
    in turn, so a batch may span the end of one pass and the start of the next).

    Pass ``e`` over ``n`` events is ``default_rng([seed, n, e]).permutation(n)``: the state is three integers
    (:meth:`state`, kept in each checkpoint's state.json), so a resumed run draws exactly what the uninterrupted
    one would. A new set of events (the sequential strategy adding a momentum) starts again at pass 0.
    """

    def __init__(self, seed, state=None):
        self.seed = int(seed)
        st = state or {}
        self.size, self.epoch, self.pos = st.get("size"), int(st.get("epoch", 0)), int(st.get("pos", 0))
        self._order = None

    def state(self):
        return {"size": self.size, "epoch": self.epoch, "pos": self.pos}

    def _pass(self):
        return np.random.default_rng([self.seed, int(self.size), self.epoch]).permutation(int(self.size))

    def take(self, n, n_events, pool=None):
        """The next ``n`` event indices (of ``pool``, an index array, when given; else of range(n_events))."""
        size = int(pool.size) if pool is not None else int(n_events)
        if size != self.size:
            self.size, self.epoch, self.pos, self._order = size, 0, 0, None
        if self._order is None:
            self._order = self._pass()
        out, need = [], n
        while need:
            if self.pos == size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._pass()
            k = min(need, size - self.pos)
            out.append(self._order[self.pos:self.pos + k])
            self.pos += k
            need -= k
        idx = np.concatenate(out)
        return pool[idx] if pool is not None else idx


def draw_batches(rng, n_events, cfg, pool=None, sampler=None):
    """Random inputs of one iteration from the numpy Generator: event indices, noise, interpolation weights.

    Each iteration draws n_critic x batch real showers (FastCaloGAN's n_disc x batch), uniformly with
    replacement from the training events, or from the event indices ``pool`` when given (the sequential
    strategy), or, with an :class:`EpochBatches` ``sampler``, the next ones of its epochs without replacement.
    Returns idx (n_critic, B) int32, noise (n_critic + 1, B, latent) float32 (the last slice feeds
    the generator step, which takes the conditions of the last critic batch) and eps (n_critic, B, 1) float32.
    """
    b, k, latent = cfg["batch_size"], cfg["n_critic"], cfg["latent_dim"]
    if sampler is not None:
        idx = sampler.take(k * b, n_events, pool).reshape(k, b).astype(np.int32)
    elif pool is None:
        idx = rng.integers(0, n_events, size=(k, b), dtype=np.int64).astype(np.int32)
    else:
        idx = pool[rng.integers(0, pool.size, size=(k, b), dtype=np.int64)].astype(np.int32)
    noise = rng.standard_normal((k + 1, b, latent), dtype=np.float32)
    noise *= cfg["noise"]["std"]
    noise += cfg["noise"]["mean"]
    eps = rng.random((k, b, 1), dtype=np.float32)
    return idx, noise, eps


class _TensorFlowStep:
    """The iteration as one ``tf.function`` (XLA with ``jit``): GradientTape for the losses and the penalty."""

    def __init__(self, gen, critic, opt_g, opt_d, cfg, voxels, cond, jit=True, ekin=None):
        import tensorflow as tf

        self.gen, self.critic, self.opt_g, self.opt_d = gen, critic, opt_g, opt_d
        self.x_all = tf.constant(voxels)
        self.c_all = tf.constant(cond)
        e_all = tf.constant(_step_ekin(voxels, ekin))
        b, k, lam = cfg["batch_size"], cfg["n_critic"], float(cfg["lambda_gp"])
        bn_train = batchnorm_training(cfg)
        extra = _critic_extra(cfg, tf.matmul, tf.sigmoid, tf.constant)
        leak = float(cfg.get("relu_gradient_leak", 0.0))
        pre = output_preactivation(gen) if leak > 0 else None

        def gen_train(z, c):    # the generator update's voxels: the ReLU's gradient leaks with --relu-gradient-leak
            if pre is None:
                return gen([z, c], training=bn_train)
            return leaky_gradient_relu(pre([z, c], training=bn_train), leak, tf.minimum, tf.nn.relu,
                                       tf.stop_gradient)

        def critic_update(x, c, e, z, eps):
            fake = gen([z, c], training=bn_train)
            interp = eps * x + (1.0 - eps) * fake
            with tf.GradientTape() as tape:
                with tf.GradientTape() as gp_tape:
                    # the penalty's coordinates: the summaries count as inputs of their own, so the path from the
                    # voxels through them is cut here (the generator's gradient below keeps it)
                    coords = [interp] + [tf.stop_gradient(t) for t in extra(interp, e)]
                    for t in coords:
                        gp_tape.watch(t)
                    d_interp = critic([interp, c] + coords[1:], training=True)
                grads = gp_tape.gradient(d_interp, coords)
                norm = tf.sqrt(sum(tf.reduce_sum(tf.square(g), axis=1) for g in grads) + 1e-12)
                gp = tf.reduce_mean(tf.square(norm - 1.0))
                both = tf.concat([x, fake], 0)
                d = critic([both, tf.concat([c, c], 0)] + extra(both, tf.concat([e, e], 0)), training=True)
                w = tf.reduce_mean(d[:b]) - tf.reduce_mean(d[b:])
                loss = lam * gp - w
            grads = tape.gradient(loss, critic.trainable_variables)
            opt_d.apply(grads, critic.trainable_variables)
            return tf.stack([loss, gp, w])

        def iteration(x_all, c_all, idx, noise, eps):
            parts = []
            for i in range(k):   # unrolled: the k critic updates are one compiled graph
                parts.append(critic_update(tf.gather(x_all, idx[i]), tf.gather(c_all, idx[i]),
                                           tf.gather(e_all, idx[i]), noise[i], eps[i]))
            c = tf.gather(c_all, idx[k - 1])         # FastCaloGAN: the conditions of the last critic batch
            e = tf.gather(e_all, idx[k - 1])
            with tf.GradientTape() as tape:
                fake = gen_train(noise[k], c)
                g_loss = -tf.reduce_mean(critic([fake, c] + extra(fake, e), training=True))
            grads = tape.gradient(g_loss, gen.trainable_variables)
            opt_g.apply(grads, gen.trainable_variables)
            m = tf.reduce_mean(tf.stack(parts), axis=0)
            return tf.stack([m[0], g_loss, m[1], m[2]])

        self._fn = tf.function(iteration, jit_compile=bool(jit), autograph=False)

    def __call__(self, idx, noise, eps):
        return self._fn(self.x_all, self.c_all, idx, noise, eps)

    def sync(self):
        """Keras variables already hold the state (TensorFlow updates them in place)."""


class _JaxStep:
    """The iteration as one ``jax.jit`` function over explicit state (``stateless_call``/``stateless_apply``)."""

    def __init__(self, gen, critic, opt_g, opt_d, cfg, voxels, cond, jit=True, ekin=None):
        import jax
        import jax.numpy as jnp

        self.gen, self.critic, self.opt_g, self.opt_d = gen, critic, opt_g, opt_d
        self.x_all = jnp.asarray(voxels)
        self.c_all = jnp.asarray(cond)
        e_all = jnp.asarray(_step_ekin(voxels, ekin))
        b, k, lam = cfg["batch_size"], cfg["n_critic"], float(cfg["lambda_gp"])
        bn_train = batchnorm_training(cfg)
        extra = _critic_extra(cfg, jnp.matmul, jax.nn.sigmoid, jnp.asarray)
        leak = float(cfg.get("relu_gradient_leak", 0.0))
        pre = output_preactivation(gen) if leak > 0 else None

        def score(d_tv, d_ntv, x, c, e, coords=None):
            out, _ = critic.stateless_call(d_tv, d_ntv, [x, c] + (extra(x, e) if coords is None else coords),
                                           training=True)
            return out[:, 0]

        def critic_loss(d_tv, d_ntv, x, c, e, fake, eps):
            interp = eps * x + (1.0 - eps) * fake
            coords = [interp] + extra(interp, e)             # the penalty's coordinates
            grads = jax.grad(lambda cs: jnp.sum(score(d_tv, d_ntv, cs[0], c, e, cs[1:])))(coords)
            sq = sum(jnp.sum(jnp.square(g), axis=1) for g in grads)
            gp = jnp.mean(jnp.square(jnp.sqrt(sq + 1e-12) - 1.0))
            d = score(d_tv, d_ntv, jnp.concatenate([x, fake], 0), jnp.concatenate([c, c], 0),
                      jnp.concatenate([e, e], 0))
            w = jnp.mean(d[:b]) - jnp.mean(d[b:])
            return lam * gp - w, (gp, w)

        def gen_loss(g_tv, g_ntv, d_tv, d_ntv, z, c, e):
            if pre is None:
                fake, g_ntv = gen.stateless_call(g_tv, g_ntv, [z, c], training=bn_train)
            else:               # --relu-gradient-leak (same variables, same order: see output_preactivation)
                x, g_ntv = pre.stateless_call(g_tv, g_ntv, [z, c], training=bn_train)
                fake = leaky_gradient_relu(x, leak, jnp.minimum, jax.nn.relu, jax.lax.stop_gradient)
            return -jnp.mean(score(d_tv, d_ntv, fake, c, e)), g_ntv

        def iteration(state, x_all, c_all, idx, noise, eps):
            g_tv, g_ntv, d_tv, d_ntv, og, od = state
            parts = []
            for i in range(k):
                x, c, e = x_all[idx[i]], c_all[idx[i]], e_all[idx[i]]
                fake, g_ntv = gen.stateless_call(g_tv, g_ntv, [noise[i], c], training=bn_train)
                (loss, (gp, w)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
                    d_tv, d_ntv, x, c, e, jax.lax.stop_gradient(fake), eps[i])
                d_tv, od = opt_d.stateless_apply(od, grads, d_tv)
                parts.append(jnp.stack([loss, gp, w]))
            c, e = c_all[idx[k - 1]], e_all[idx[k - 1]]   # FastCaloGAN: the conditions of the last critic batch
            (g_loss, g_ntv), grads = jax.value_and_grad(gen_loss, has_aux=True)(g_tv, g_ntv, d_tv, d_ntv, noise[k],
                                                                                c, e)
            g_tv, og = opt_g.stateless_apply(og, grads, g_tv)
            m = jnp.mean(jnp.stack(parts), axis=0)
            return (g_tv, g_ntv, d_tv, d_ntv, og, od), jnp.stack([m[0], g_loss, m[1], m[2]])

        self._fn = jax.jit(iteration, donate_argnums=0) if jit else iteration
        self.state = self._read_state()

    def _read_state(self):
        v = lambda seq: [x.value for x in seq]  # noqa: E731
        return (v(self.gen.trainable_variables), v(self.gen.non_trainable_variables),
                v(self.critic.trainable_variables), v(self.critic.non_trainable_variables),
                v(self.opt_g.variables), v(self.opt_d.variables))

    def __call__(self, idx, noise, eps):
        self.state, losses = self._fn(self.state, self.x_all, self.c_all, idx, noise, eps)
        return losses

    def sync(self):
        """Write the functional state back into the Keras variables (before saving a checkpoint)."""
        targets = (self.gen.trainable_variables, self.gen.non_trainable_variables,
                   self.critic.trainable_variables, self.critic.non_trainable_variables,
                   self.opt_g.variables, self.opt_d.variables)
        for variables, values in zip(targets, self.state):
            for var, val in zip(variables, values):
                var.assign(val)


def output_preactivation(gen):
    """The generator's voxels before its output ReLU: a Model sharing ``gen``'s variables, in the same order, for
    :func:`leaky_gradient_relu` (``--relu-gradient-leak``)."""
    keras = _keras()
    last = gen.get_layer("voxels")
    relu = ((isinstance(last, keras.layers.LeakyReLU) and float(last.negative_slope) == 0.0)
            or (type(last) is keras.layers.Activation and getattr(last.activation, "__name__", "") == "relu"))
    if not relu:
        raise UserError("--relu-gradient-leak: the generator's output layer 'voxels' is not a ReLU of its own")
    pre = keras.Model(gen.inputs, last.input, name="generator_preactivation")
    for a, b in ((pre.trainable_variables, gen.trainable_variables),
                 (pre.non_trainable_variables, gen.non_trainable_variables)):
        if [id(v) for v in a] != [id(v) for v in b]:
            raise RuntimeError("generator_preactivation does not hold the generator's variables in their order")
    return pre


def leaky_gradient_relu(x, slope, minimum, relu, stop_gradient):
    """relu(x) in value; in gradient 1 where x > 0 and ``slope`` where x <= 0 (with the backend's ``minimum``,
    ``relu`` and ``stop_gradient``): a voxel the ReLU holds at zero for every input still feels the critic.

    >>> leaky_gradient_relu(np.array([-2.0, 3.0]), 0.1, np.minimum, lambda v: np.maximum(v, 0), lambda v: v)
    array([0., 3.])
    """
    neg = minimum(x, 0.0)
    return relu(x) + slope * (neg - stop_gradient(neg))


def _step_ekin(voxels, ekin):
    """(N, 1) float32 E_kin of the training events for the step (ones when the critic does not need it)."""
    if ekin is None:
        return np.ones((len(voxels), 1), dtype=np.float32)
    return np.asarray(ekin, dtype=np.float32).reshape(-1, 1)


def _critic_extra(cfg, matmul, sigmoid, const):
    """``extra(x, e)``: the critic's inputs beside [voxels, condition], computed from the (normalised) voxels
    ``x`` and their events' E_kin ``e`` (N, 1) with the backend's ``matmul``/``sigmoid``/``const``: the
    independent summaries (:func:`summary_projection`) and the sparsity counts (:func:`sparsity_projection`),
    each present only when the run's critic has it."""
    n = cfg.get("n_features", cfg["n_voxels"])
    proj = summary_projection(n, cfg["critic"].get("summaries"))
    sp = sparsity_projection(n, cfg["critic"].get("sparsity"))
    proj = None if proj is None else (const(proj[0]), const(proj[1]))
    sp = None if sp is None else (const(sp[0]), const(sp[1]), sp[2], sp[3])

    def extra(x, e):
        out = [] if proj is None else [matmul(x, proj[0]) + proj[1]]
        if sp is not None:
            out.append(matmul(sigmoid((x * e - sp[2]) / sp[3]), sp[0]) + sp[1])
        return out
    return extra


def make_train_step(gen, critic, opt_g, opt_d, cfg, voxels, cond, jit=True, ekin=None):
    """The backend's compiled training iteration: ``step(idx, noise, eps) -> losses (4,)``.

    Loss vector: [critic loss, generator loss, gradient penalty, Wasserstein estimate], critic values
    averaged over the iteration's critic updates. ``ekin`` (N,): the events' E_kin in MeV, which a critic with
    ``sparsity`` needs (voxel / E_kin back to MeV, against the readout threshold).
    """
    if cfg["critic"].get("sparsity") and ekin is None:
        raise ValueError("a critic with sparsity counts needs the events' E_kin (ekin=)")
    opt_g.build(gen.trainable_variables)
    opt_d.build(critic.trainable_variables)
    backend = _backend()
    if backend == "tensorflow":
        return _TensorFlowStep(gen, critic, opt_g, opt_d, cfg, voxels, cond, jit, ekin)
    if backend == "jax":
        return _JaxStep(gen, critic, opt_g, opt_d, cfg, voxels, cond, jit, ekin)
    raise UserError(f"KERAS_BACKEND={backend} is not supported by train.py (use tensorflow or jax)")


# ----------------------------------------------------------------------------------------------
# checkpoints

def list_checkpoints(run):
    """[(iteration, path)] of the complete checkpoints ``ckpt_<N>/`` of a run, sorted by iteration.

    Complete = renamed into place with ``generator.keras`` and ``state.json`` inside; temporary
    directories of a checkpoint being written (or abandoned by a kill) never match.
    """
    return plumbing_list_checkpoints(run, ("generator.keras", "state.json"))


def _resumable(path):
    res = os.path.join(path, "resume")
    return all(os.path.isfile(os.path.join(res, f))
               for f in ("generator.weights.h5", "critic.weights.h5", "optimizers.npz"))


def save_checkpoint(run, iteration, gen, critic, opt_g, opt_d, rng, extra):
    """Write ``ckpt_<iteration>/`` atomically: generator.keras, state.json, resume/ (weights + optimisers)."""
    final = os.path.join(run, f"ckpt_{iteration}")
    with atomic_directory(final) as tmp:
        gen.save(os.path.join(tmp, "generator.keras"))
        res = os.path.join(tmp, "resume")
        os.mkdir(res)
        gen.save_weights(os.path.join(res, "generator.weights.h5"))
        critic.save_weights(os.path.join(res, "critic.weights.h5"))
        arrays = {f"g{i:04d}": np.asarray(v.value) for i, v in enumerate(opt_g.variables)}
        arrays.update({f"d{i:04d}": np.asarray(v.value) for i, v in enumerate(opt_d.variables)})
        np.savez(os.path.join(res, "optimizers.npz"), **arrays)
        state = {"iteration": int(iteration), "rng": rng.bit_generator.state, **extra}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    return final


def restore_checkpoint(path, gen, critic, opt_g, opt_d):
    """Load weights and optimiser state of a checkpoint into built networks/optimisers; returns state.json."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    res = os.path.join(path, "resume")
    gen.load_weights(os.path.join(res, "generator.weights.h5"))
    critic.load_weights(os.path.join(res, "critic.weights.h5"))
    opt_g.build(gen.trainable_variables)
    opt_d.build(critic.trainable_variables)
    with np.load(os.path.join(res, "optimizers.npz")) as z:
        for prefix, opt in (("g", opt_g), ("d", opt_d)):
            for i, var in enumerate(opt.variables):
                key = f"{prefix}{i:04d}"
                if key not in z or tuple(z[key].shape) != tuple(var.shape):
                    raise UserError(f"{res}/optimizers.npz: optimiser state '{key}' missing or of the wrong shape")
                var.assign(z[key])
    return state


def prune_resume_state(run, keep):
    """Drop the resume/ folder of all but the newest ``keep`` checkpoints (generator.keras stays)."""
    import shutil

    ckpts = [p for _, p in list_checkpoints(run) if os.path.isdir(os.path.join(p, "resume"))]
    for path in ckpts[:-keep]:
        trash = os.path.join(path, ".resume-deleting")
        os.replace(os.path.join(path, "resume"), trash)
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# losses.csv: appended at each checkpoint, trimmed to the checkpoint on resume

def init_losses(path):
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerow(LOSS_COLUMNS)


def trim_losses(path, last_iteration):
    """Keep the header and the rows with iteration <= last_iteration (atomic rewrite)."""
    if not os.path.isfile(path):
        init_losses(path)
        return 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [r for r in rows[1:]   # a row cut by a kill has fewer fields: dropped
            if len(r) == len(LOSS_COLUMNS) and r[0].isdigit() and int(r[0]) <= last_iteration]
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LOSS_COLUMNS)
            w.writerows(kept)
    return len(kept)


def append_losses(path, first_iteration, losses):
    """Append rows (iteration, 4 loss values) and fsync, so they are on disk before the checkpoint is."""
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        for i, row in enumerate(losses):
            w.writerow([first_iteration + i] + [f"{v:.7g}" for v in row])
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# the command

def xml_settings(args, attrs):
    """FastCaloGAN settings for the training file's particle, slice and energy range from a binning XML.

    The XML is ``--binning`` (an unreadable one is an error) or the training file's ``binning`` attribute
    (skipped when that file is missing or has no slice for the particle). Returns ({XML attribute: (value,
    source)}, the XML path or None, the slice's Geometry or None).
    """
    path = args.binning or attrs.get("binning")
    if not path:
        return {}, None, None
    eta = None
    if "eta_min" in attrs and "eta_max" in attrs:
        eta = 0.5 * (float(attrs["eta_min"]) + float(attrs["eta_max"])) / 100.0
    try:
        geom = read_geometry(path, attrs["particle"], eta)
    except UserError:
        if args.binning:
            raise
        return {}, None, None
    return geom.gan_settings(attrs.get("range")), path, geom


def default_network(particle, p_max, range_name=None):
    """(activation, batch-norm, output activation) of FastCaloGAN's generator when the XML says nothing.

    e/gamma: ReLU + batch-norm up to p = 2^12 MeV (its Low12 / UltraLow12 network), swish + batch-norm above
    (High12); pions and protons: ReLU without batch-norm (All). The output is a ReLU, except when a FastCaloGAN
    range name (``High12``, ``All``, ...; plumbing.FASTCALOGAN_RANGES) picks the swish network: then, as BoloGAN
    builds it (model/conditional_wgangp.py, chosen by the range's activationFunction), it ends in
    Dense -> BatchNorm -> swish, whose voxels can be negative. calokit's own names (low/high/all) keep a ReLU
    output (non-negative showers).
    """
    if particle in ("photon", "electron"):
        low = p_max is not None and float(p_max) <= 2.0**12 * (1 + 1e-9)
        if low:
            return "relu", True, "relu"
        return "swish", True, ("swish" if range_name in FASTCALOGAN_RANGES else "relu")
    return "relu", False, "relu"


class _Settings:
    """Each setting from the command line, else the recipe, else the XML, else a default; remembers where each
    came from."""

    def __init__(self, xml, recipe="fastcalogan", particle=None):
        self.xml = xml
        self.recipe_name = recipe
        self.recipe = recipe_options(recipe, particle)
        self.source = {}

    def get(self, key, cli, xml_key, default, default_source="default", conv=None):
        if cli is not None:
            value, src = cli, "command line"
        elif key in self.recipe:
            value, src = self.recipe[key]
        elif xml_key in self.xml:
            raw, src = self.xml[xml_key]
            value = conv(raw) if conv else raw
        else:
            value, src = default, default_source
        self.source[key] = src
        return value


def _xml_activation(name):
    return {"relu": "relu", "swish": "swish", "silu": "swish"}.get(str(name).lower(), str(name))


def make_config(args, data, dropped):
    """config.json content of a fresh run; ``settings_source`` says where each hyper-parameter came from."""
    attrs = data["attrs"]
    particle = attrs["particle"]
    n_vox = int(attrs["n_voxels"])
    check_recipe_norm(args.recipe, attrs, args.data)
    xml, xml_path, geom = xml_settings(args, attrs)
    st = _Settings(xml, args.recipe, particle)
    spans = attrs.get("layer_spans") if training_norm(attrs) == "layer" else None
    n_feat = n_vox if spans is None else layer_representation_size(spans)
    act0, bn0, out0 = default_network(particle, attrs.get("p_max"), attrs.get("range"))
    activation = st.get("activation", args.activation, "activationFunction", act0, conv=_xml_activation)
    batchnorm = bool(st.get("batchnorm", args.batchnorm, "useBatchNormalisation", bn0))
    # FastCaloGAN's swish network ends in Dense -> BatchNorm -> swish, whose voxels can be negative (down to
    # -0.28 E_kin; FastCaloSim adds them as they are; evaluate.py zeroes them with its threshold as CaloChallenge's
    # does). It is built when the XML's range asks for it, when the training file's range is a FastCaloGAN name
    # (as BoloGAN builds it) or with --output-activation swish; otherwise the output is a ReLU.
    from_xml = batchnorm and activation == "swish" and st.source["activation"] not in ("default", "command line")
    from_range = batchnorm and activation == "swish" and out0 == "swish" and st.source["activation"] == "default"
    if from_range:
        from_xml, st.source["activation"] = True, f"default (FastCaloGAN range {attrs.get('range')})"
    output_activation = st.get("output_activation", args.output_activation, None, "swish" if from_xml else "relu",
                               "default (ReLU: non-negative showers)" if not from_xml else st.source["activation"])
    output_batchnorm = batchnorm and activation == "swish" and output_activation == "swish"
    st.source["output_batchnorm"] = st.source["output_activation"]
    bn_mode = st.get("batchnorm_mode", args.batchnorm_mode, None, "inference")
    if spans is not None:             # the heads replace the output layer: the training file decides
        st.source["output_activation"] = st.source["output_batchnorm"] = \
            "training file (layer representation): CaloShowerGAN's softmax / ReLU heads"
    for name in (activation, output_activation):
        try:
            _keras().activations.get(name)
        except (ValueError, TypeError):
            raise UserError(f"activation {name!r} ({st.source['activation']}): not a Keras activation") from None
    hidden = st.get("generator_layers", args.generator_layers, "generator", list(GENERATOR_HIDDEN))
    if args.critic_width is not None:
        critic = st.get("critic_layers", [int(args.critic_width)] * 3, None, None)
    else:
        critic = st.get("critic_layers", None, "discriminator", [min(n_feat, CRITIC_WIDTH_CAP)] * 3)
    summaries = None
    layers_too = bool(st.get("critic_summaries", args.critic_summaries, None, False))
    etot_spread = float(st.get("critic_etot", args.critic_etot, None, 0.0))
    if spans is not None and layers_too:
        raise UserError(f"{args.data}: --critic-summaries sums voxels / E_kin per layer; this file holds the layer "
                        f"representation, whose layer fractions the critic already sees (--critic-etot works)")
    if spans is not None and etot_spread > 0:      # E_tot / E_kin is the representation's last value
        summaries = summary_settings(data["voxels"], [], spread=etot_spread, total_column=n_feat - 1)
    elif layers_too or etot_spread > 0:
        summaries = summary_settings(data["voxels"], layer_spans(geom, n_vox) if layers_too else [],
                                     spread=etot_spread if etot_spread > 0 else 1.0)
    if summaries:           # --critic-etot: the penalty's own coordinates; --critic-summaries alone: as before
        summaries["penalty"] = "independent" if etot_spread > 0 else "voxels"
    sparsity = critic_sparsity(st, args, data, geom, spans, n_vox)
    lr_decay = float(st.get("lr_decay", args.lr_decay, None, 1.0))
    init = st.get("init", args.init, None, "he")
    leak = float(st.get("relu_gradient_leak", args.relu_gradient_leak, None, 0.0))
    if leak > 0 and not (spans is None and output_activation == "relu" and (batchnorm or init != "he")):
        raise UserError("--relu-gradient-leak: this generator's output is not a ReLU layer of its own (it needs "
                        "prepare's default --norm, --output-activation relu, and batch-norm or --init glorot)")
    latent = st.get("latent_dim", args.latent_dim, "latentDim", int(attrs["latent_dim"]), "training file")
    batch = st.get("batch_size", args.batch_size, "batchSize", 128)
    n_critic = st.get("n_critic", args.n_critic, "gdratio", 5)
    lam = st.get("lambda_gp", args.lambda_gp, "lambda", 10.0)
    lr = st.get("lr", args.lr, "learningRate", 1e-4)
    beta1 = st.get("beta1", args.beta1, "beta", 0.55)
    if min(batch, n_critic, latent) < 1:
        raise UserError(f"batch size, critic steps and latent dimension must be >= 1 (from {xml_path})")
    check_hyper(lr, lam, beta1, args.beta2, f"{xml_path}: learningRate must be > 0, lambda >= 0, beta in [0, 1)")
    cfg = {k: attrs[k] for k in TRAINING_ATTRS if k in attrs}
    cfg.update({k: v for k, v in attrs.items() if k not in cfg})
    cfg.update({
        "n_voxels": n_vox, "n_features": int(n_feat), "latent_dim": int(latent),
        "train_data": os.path.abspath(args.data), "seed": int(args.seed), "iterations": int(args.iterations),
        "checkpoint_every": int(args.checkpoint_every), "batch_size": int(batch),
        "n_critic": int(n_critic), "lambda_gp": float(lam), "lr": float(lr),
        "beta1": float(beta1), "beta2": float(args.beta2),
        "generator": generator_settings(hidden, activation, batchnorm, output_activation, output_batchnorm, bn_mode,
                                        spans),
        "critic": {"hidden": [int(n) for n in critic], "activation": "relu", "summaries": summaries,
                   **({"sparsity": sparsity} if sparsity else {})},
        "recipe": args.recipe, "recipe_description": RECIPES[args.recipe]["description"],
        "lr_decay": lr_decay, "lr_decay_iterations": int(args.iterations), "init": init,
        **({"relu_gradient_leak": leak} if leak > 0 else {}),
        "batches": args.batches,
        "strategy": {"name": args.strategy, "first_sample_iterations": int(args.first_sample_iterations),
                     "add_every": int(args.add_every)},
        "settings_xml": xml_path,
        "xml_settings": {k: v for k, (v, _) in xml.items()},
        "settings_source": st.source,
        "excluded_energies": sorted(float(e) for e in dropped),
        "excluded_events": {f"{e:g}": n for e, n in sorted(dropped.items())},
        "exclude_rtol": EXCLUDE_RTOL,
        "n_events": int(data["voxels"].shape[0]), "n_events_used": int(data["voxels"].shape[0] - sum(dropped.values())),

        "noise": {"mean": NOISE_MEAN, "std": NOISE_STD},
        "condition": "[label, 0]",
        "normalisation": "voxels / E_kin" if spans is None else LAYER_NORMALISATION,
        "backend": _backend(),
        "jit": bool(args.jit),
        "keep_resume": int(args.keep_resume),
    })
    if "einc" in data:                      # the E_kin the network saw (the label range may be wider)
        einc = np.asarray(data["einc"], dtype=np.float64)
        cfg["data_ekin_range"] = [float(x) for x in kinetic_energy(np.array([einc.min(), einc.max()]), particle)]
    return cfg


def critic_sparsity(st, args, data, geom, spans, n_vox):
    """config.json's ``critic.sparsity`` (:func:`sparsity_settings`) for --critic-sparsity, else None; per
    voxelised layer of the slice's geometry (the whole shower as one span without a geometry)."""
    spread = float(st.get("critic_sparsity", args.critic_sparsity, None, 0.0))
    threshold = float(st.get("critic_threshold", args.critic_threshold, None, 1.0,
                             "default (1 MeV: CaloChallenge dataset 1's readout threshold)"))
    if spread <= 0:
        return None
    if spans is not None:
        raise UserError(f"{args.data}: --critic-sparsity counts voxel / E_kin against a threshold; this file holds "
                        f"the layer representation (train on a file of prepare's default --norm)")
    ekin = kinetic_energy(np.asarray(data["einc"], dtype=np.float64), data["attrs"]["particle"])
    return sparsity_settings(data["voxels"], ekin, layer_spans(geom, n_vox) or [(0, n_vox)], spread, threshold)


LAYER_NORMALISATION = ("layer representation: [voxel / its layer's energy (zero voxels set to 1e-4 MeV first), layer "
                       "energy / E_tot, E_tot / E_kin]; voxel / E_kin = product (plumbing.from_layer_representation)")


def generator_settings(hidden, activation, batchnorm, output_activation, output_batchnorm, bn_mode, spans=None):
    """config.json's generator block: FastCaloGAN's network, or with layer ``spans`` (a training file of the
    layer representation) its body with CaloShowerGAN's heads (:func:`build_layer_generator`)."""
    g = {"hidden": [int(n) for n in hidden], "activation": activation, "batchnorm": batchnorm,
         "output_activation": output_activation, "output_batchnorm": output_batchnorm, "batchnorm_mode": bn_mode,
         "layout": "fastcalogan"}
    if spans is not None:
        g.update(layout="layer_heads", spans=[[int(a), int(b)] for a, b in spans], output_activation=None,
                 output_batchnorm=False,
                 heads="Dense(n_voxels_of_layer, softmax) per layer, Dense(n_layers, softmax), Dense(1, relu)")
    return g


def _resume_config(args, run):
    cfg = read_run_config(run)
    if os.path.abspath(args.data) != cfg.get("train_data"):
        raise UserError(f"--data {args.data}: the run in {run} was trained on {cfg.get('train_data')}")
    if int(args.seed) != int(cfg.get("seed", args.seed)):
        raise UserError(f"--seed {args.seed}: the run in {run} uses seed {cfg.get('seed')}")
    if sorted(args.exclude_energy) and sorted(float(e) for e in args.exclude_energy) != cfg.get("excluded_energies"):
        raise UserError(f"--exclude-energy {args.exclude_energy}: the run in {run} excludes "
                        f"{cfg.get('excluded_energies')}")
    cfg["iterations"] = int(args.iterations)
    cfg["checkpoint_every"] = int(args.checkpoint_every)
    return cfg


#: settings a resumed run may change: how long it runs and how it checkpoints, not what it trains
RESUME_FREE = ("iterations", "checkpoint_every", "keep_resume", "jit", "backend", "lr_decay_iterations",
               "settings_source", "settings_xml", "xml_settings")    # where values came from; the values are checked


def _leaves(obj, prefix=""):
    """{"generator.activation": "swish", ...} of a nested config dict."""
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def check_resume_settings(stored, fresh, run):
    """Refuse (UserError) to resume ``run`` with a setting that differs from the one it was started with.

    >>> check_resume_settings({"lr": 2e-4, "iterations": 10}, {"lr": 2e-4, "iterations": 20}, "run")
    >>> check_resume_settings({"lr": 2e-4}, {"lr": 1e-4}, "run")
    Traceback (most recent call last):
    ...
    HighLevelFeatures.UserError: --resume: run was started with lr = 0.0002, this command gives 0.0001 (...)
    """
    old, new = _leaves(stored), _leaves(fresh)
    for key in sorted(set(old) & set(new)):
        if key.split(".")[0] not in RESUME_FREE and old[key] != new[key]:
            raise UserError(f"--resume: {run} was started with {key} = {old[key]!r}, this command gives {new[key]!r} "
                            f"(resume with the run's settings, or train into another --out)")


def open_run(args, data):
    """Check --out and --resume, write config.json; returns (cfg, checkpoint to resume from or None, voxels,
    labels, incident energies) of the events to train on."""
    run = args.out
    ckpts = list_checkpoints(run) if os.path.isdir(run) else []
    resumable = [(it, p) for it, p in ckpts if _resumable(p)]
    if ckpts and not args.resume:
        raise UserError(f"{run}: already holds checkpoints (last ckpt_{ckpts[-1][0]}); pass --resume to continue "
                        f"or choose another --out")
    if args.resume and ckpts and not resumable:
        raise UserError(f"{run}: no checkpoint with resume state (ckpt_<N>/resume/) to continue from")
    resume_from = resumable[-1][1] if args.resume and resumable else None
    if resume_from:
        cfg = _resume_config(args, run)
        excluded = cfg.get("excluded_energies", [])
    else:
        excluded = args.exclude_energy
    voxels, label, dropped, einc = select_training_events(data, excluded, args.data)
    if resume_from:
        check_resume_settings(cfg, make_config(args, data, dropped), run)
    else:
        cfg = make_config(args, data, dropped)
    ensure_dir(run)
    for name in os.listdir(run):   # checkpoints a kill left half-written (never loaded, but as big as one)
        if name.startswith(".tmp-ckpt_"):
            shutil.rmtree(os.path.join(run, name), ignore_errors=True)
    if voxels.shape[1] != cfg.get("n_features", cfg["n_voxels"]):
        raise UserError(f"{args.data}: the training data have {voxels.shape[1]} columns, the run expects "
                        f"{cfg.get('n_features', cfg['n_voxels'])}")
    cfg["backend"] = _backend()
    write_json(os.path.join(run, "config.json"), cfg)
    return cfg, resume_from, voxels, label, einc


def build_training(cfg, run, resume_from, deterministic=True):
    """Seeded networks, optimisers and batch generator, restored from ``resume_from`` when given; returns
    (gen, critic, opt_g, opt_d, rng, state.json of the checkpoint resumed from, or {"iteration": 0})."""
    keras = _keras()
    keras.utils.set_random_seed(cfg["seed"])
    if deterministic and cfg["backend"] == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    gen, critic = networks_from_config(cfg)
    opt_g, opt_d = make_optimizer(cfg), make_optimizer(cfg, cfg["n_critic"])
    losses_path = os.path.join(run, "losses.csv")
    rng = np.random.default_rng(cfg["seed"])
    state = {"iteration": 0}
    if resume_from:
        state = restore_checkpoint(resume_from, gen, critic, opt_g, opt_d)
        rng.bit_generator.state = state["rng"]
        trim_losses(losses_path, int(state["iteration"]))
    else:
        init_losses(losses_path)
    return gen, critic, opt_g, opt_d, rng, state


def train_loop(run, cfg, nets, step, rng, start, n_events, sequential=None, sampler=None):
    """Iterations start + 1 .. cfg["iterations"]: losses appended and a checkpoint written every
    ``checkpoint_every`` and at the end; returns (checkpoints written, iterations per second)."""
    from tqdm import tqdm

    gen, critic, opt_g, opt_d = nets
    losses_path = os.path.join(run, "losses.csv")
    target, every = cfg["iterations"], cfg["checkpoint_every"]
    t0 = time.perf_counter()
    pending, first, written = [], start + 1, []
    tty = sys.stderr.isatty()
    with tqdm(total=target, initial=start, file=sys.stderr, desc="train", unit="it", dynamic_ncols=tty,
              mininterval=1.0 if tty else 60.0) as bar:       # a line a minute into log files
        for it in range(start + 1, target + 1):
            pool = sequential(it) if sequential else None
            pending.append(step(*draw_batches(rng, n_events, cfg, pool, sampler)))
            bar.update(1)
            if it % every == 0 or it == target:
                rows = np.asarray([np.asarray(p) for p in pending], dtype=np.float64)
                if not np.all(np.isfinite(rows)):
                    bad = first + int(np.argwhere(~np.isfinite(rows))[0][0])
                    raise RuntimeError(f"training diverged: non-finite loss at iteration {bad}")
                append_losses(losses_path, first, rows)
                step.sync()
                written.append(save_checkpoint(run, it, gen, critic, opt_g, opt_d, rng,
                                               {"seed": cfg["seed"], "backend": cfg["backend"],
                                                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                **({"batches": sampler.state()} if sampler else {})}))
                prune_resume_state(run, cfg.get("keep_resume", 1))
                bar.set_postfix(critic=f"{rows[-1, 0]:.3g}", gen=f"{rows[-1, 1]:.3g}", refresh=False)
                pending, first = [], it + 1
    dt = time.perf_counter() - t0
    return written, (target - start) / dt if dt > 0 else float("nan")


def _main(argv):
    args = parse_args(argv)
    data = load_training_file(args.data)
    run = args.out
    cfg, resume_from, voxels, label, einc = open_run(args, data)
    gen, critic, opt_g, opt_d, rng, state = build_training(cfg, run, resume_from, args.deterministic)
    start, target = int(state["iteration"]), cfg["iterations"]
    if start >= target:
        print(f"train.py: {run} is already at iteration {start} (target {target}); nothing to do")
        return 0
    step = make_train_step(gen, critic, opt_g, opt_d, cfg, voxels, condition_vector(label), jit=cfg.get("jit", True),
                           ekin=kinetic_energy(einc, cfg["particle"]))
    sequential = SequentialPool(einc, cfg) if cfg.get("strategy", {"name": "all"})["name"] == "sequential" else None
    if sequential:
        sequential(start + 1)             # an empty starting sample fails here, before any work
    sampler = (EpochBatches(cfg["seed"], state.get("batches")) if cfg.get("batches", "replacement") == "epoch"
               else None)
    written, rate = train_loop(run, cfg, (gen, critic, opt_g, opt_d), step, rng, start, voxels.shape[0], sequential,
                               sampler)
    print(f"train.py: {run}: iterations {start + 1}..{target} ({rate:.1f} it/s, {cfg['backend']}), "
          f"{len(written)} checkpoints written, last {os.path.basename(written[-1])}")
    return 0


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
