"""The LoKr training loop, read top to bottom: set-up, resume, then micro-steps and optimizer steps.

Every random draw of a sample — its timestep, its noise, its noise offset, its latent sample —
comes from a ``torch.Generator`` seeded by ``hash64(seed, micro_step, post_id)``. Which rank or
DataLoader worker handles the sample, and whether the run was resumed, changes nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hakubooru.errors import HakubooruError
from hakubooru.manifest import write_atomic
from hakubooru.rng import hash64
from hakubooru.tagcounts import ensure_tag_counts
from trainers.lokr.network import metadata
from trainers.lokr.sdxl.model import AMP_DTYPES, base_model_hash, load_base_model, training_scheduler
from trainers.lokr.sdxl import prediction
from trainers.lokr.sdxl.prediction import min_snr_weights
from trainers.lokr.observe import sampling
from trainers.lokr.data.bucketing import config_buckets
from trainers.lokr.config import check_resume_config, config_fingerprint, config_json
from trainers.lokr.data.batches import BatchDataset, BatchPlan, PlanView, dataset_options, make_loader
from trainers.lokr.data.caption_dropout import drop_captions
from trainers.lokr.data.mixing import Mixture, load_mixture
from trainers.lokr.data.vae_encode import encode_latents
from trainers.lokr.distributed import Dist, all_reduce_grads, all_reduce_sum, barrier, init_distributed, shutdown
from trainers.lokr.data.latent_cache import batch_dataset, cached_latents, open_cache
from trainers.lokr.network.naming import to_diffusers
from trainers.lokr.network.lokr import (create_lokr, init_from_lokr, lokr_param_groups, lokr_preset, lokr_state_dict,
                                   save_lokr)
from trainers.lokr.state import elastic_resume, load_latest_state, save_state, state_dir
from trainers.lokr.observe.tblog import ScalarLog
from trainers.lokr.observe.validation import Validation
from trainers.lokr.optim.ema import EMA
from trainers.lokr.optim.optimizers import check_bitsandbytes, make_optimizer, prodigy_class
from trainers.lokr.optim.schedule import lr_factor
from trainers.lokr.sdxl.text import encode_prompts

KILL_AFTER_STATE_ENV = "LOKR_TEST_KILL_AFTER_STATE"  # tests: SIGKILL right after writing this step's state


# ---------------------------------------------------------------- the pieces of one step

@dataclass
class Draws:
    """The random inputs of one micro-batch, one row per sample."""

    timesteps: torch.Tensor   # int64 (B,)
    noise: torch.Tensor       # (B, C, H, W), noise offset included
    latent_eps: torch.Tensor  # (B, C, H, W), for sampling the VAE's latent distribution


def sample_draws(seed: int, micro_step: int, ids, latent_shape, num_timesteps: int,
                 noise_offset: float) -> Draws:
    """Per-sample timestep (uniform), noise + offset·randn(C,1,1), and latent-sampling noise,
    each sample from its own generator seeded by hash64(seed, micro_step, post id)."""
    c, h, w = latent_shape
    timesteps, noise, latent_eps = [], [], []
    for post_id in ids.tolist():
        g = torch.Generator().manual_seed(hash64(seed, micro_step, post_id))
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        latent_eps.append(torch.randn((c, h, w), generator=g))
        offset = torch.randn((c, 1, 1), generator=g)
        noise.append(torch.randn((c, h, w), generator=g) + noise_offset * offset)
    return Draws(torch.cat(timesteps), torch.stack(noise), torch.stack(latent_eps))


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MSE to the target (ε or v) per sample (mean over C, H, W), weighted, averaged over the batch."""
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


# ---------------------------------------------------------------- set-up

@dataclass
class Progress:
    """Where the run is: what a training state records besides the weights."""

    step: int = 0              # optimizer steps done
    epoch: int = 0
    cursor: int = 0            # next global batch of this epoch's plan
    skipped: int = 0           # optimizer steps skipped for a non-finite loss
    nonfinite_in_row: int = 0
    started_at: float = 0.0    # when the run first started (LoKr metadata); kept on resume
    corrupt: int = 0           # samples left out for damaged bytes (data.on_corrupt = "skip")
    plan_batch: int = 0        # rows per batch of the epoch plan: per-GPU batch × GPUs at the first start


@dataclass
class Run:
    """Everything set up before the first step: the pieces the loop uses."""

    cfg: dict
    dist: Dist
    shards: Path
    output: Path
    index: object
    buckets: list
    sdxl: object
    network: object
    optimizer: object
    scaler: object
    base_lrs: list
    base_model_hash: str
    tags: dict                 # tag -> samples carrying it (LoKr metadata), on the main rank
    progress: Progress
    total_steps: int
    steps_per_epoch: int
    current_plan: BatchPlan
    latent_cache: object = None  # trainers/lokr/data/latent_cache.py; None: encode the images
    bucket_rows: object = None   # each index row's bucket (data.bucket_no_upscale gives smaller ones)
    ema: EMA | None = None       # [ema], on the main rank
    validation: Validation | None = None  # [validation]: the held-out samples
    mixture: Mixture | None = None   # the --shards folders and their weights (data/mixing.py)

    @property
    def global_batch(self) -> int:
        """Rows per micro-step over all ranks."""
        return self.cfg["train"]["batch_size"] * self.dist.world_size

    @property
    def plan_accum(self) -> int:
        """Plan batches per optimizer step (the grad_accum of the run's first start)."""
        return self.global_batch * self.cfg["train"]["grad_accum"] // self.progress.plan_batch

    def rank_plan(self, epoch: int):
        """This rank's reading of the epoch's plan: the plan itself, or a view in micro-steps of
        another size after an elastic resume."""
        plan = self.plan(epoch)
        if self.global_batch == plan.global_batch:
            return plan
        return PlanView(plan, self.global_batch, self.dist.rank, self.cfg["train"]["batch_size"])

    def draw_step(self, step: int, k: int) -> int:
        """The micro-step that keys this rank's draws in micro-step ``k`` of optimizer step
        ``step``: the index of its plan batch (the micro-step of the first start's run)."""
        tc = self.cfg["train"]
        offset = k * self.global_batch + self.dist.rank * tc["batch_size"]
        return step * self.plan_accum + offset // self.progress.plan_batch

    def plan(self, epoch: int) -> BatchPlan:
        """The batch plan of ``epoch`` (the last one made is kept: it is seconds of work at 5 M rows)."""
        if self.current_plan.epoch != epoch:
            seed = self.cfg["train"]["seed"]
            self.current_plan = BatchPlan(self.index, self.progress.plan_batch, seed, epoch, self.buckets,
                                          self.bucket_rows, self.validation.training_rows(),
                                          self.mixture.counts(seed, epoch))
        return self.current_plan

    def usable(self, epoch: int) -> int:
        """Micro-steps (of this run's size) trained in ``epoch``: whole optimizer steps of its plan."""
        return len(self.plan(epoch)) // self.plan_accum * self.cfg["train"]["grad_accum"]


def setup(cfg: dict, shards, output, *, resume=None, allow_config_change: bool = False) -> Run:
    """Read the index, build the model and its LoKr, the optimizer, and restore the newest
    valid state when resuming. Nothing here reads image data."""
    d = init_distributed(cfg["train"]["ddp_timeout"])
    tc, oc, dc = cfg["train"], cfg["optimizer"], cfg["data"]
    if not cfg["model"]["pretrained"]:
        raise HakubooruError("no base model: pass --pretrained PATH (a diffusers SDXL folder or a single-file "
                             ".safetensors checkpoint), or --config tiny for the built-in tiny model")
    if oc["name"] in ("Lion8bit", "AdamW8bit"):
        check_bitsandbytes(oc["name"])  # before loading the model
    elif oc["name"] == "Prodigy":
        prodigy_class()
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    if tc["mixed_precision"] == "fp16" and d.device.type != "cuda":
        raise HakubooruError("train.mixed_precision = \"fp16\" needs a CUDA GPU; on the CPU use \"no\" "
                             "(--set train.mixed_precision=no) or --config tiny")
    mixture = load_mixture(shards)
    index = mixture.index
    shards = mixture.sources[0].path
    buckets, bucket_rows = config_buckets(dc, index.width, index.height)
    if cfg["validation"]["samples"] >= len(index):
        raise HakubooruError(f"validation.samples = {cfg['validation']['samples']} leaves nothing to train on: "
                             f"{shards} has {len(index)} samples")

    chosen, lines = prediction.resolve(cfg["model"], prediction.detect(cfg["model"]["pretrained"],
                                                                      cfg["model"]["config"]))
    if d.is_main:
        print("\n".join(lines), file=sys.stderr)
    weight_dtype = AMP_DTYPES[tc["mixed_precision"]]
    sdxl = load_base_model(cfg, weight_dtype)
    sdxl.noise_scheduler = training_scheduler(sdxl.noise_scheduler.config, chosen)
    if cfg["sample"]["every"] and cfg["sample"]["prompts"]:
        sampling.sampler(cfg, sdxl)  # a sampler without a zero-terminal-SNR schedule: refused now, not at step 500
    for model in (sdxl.unet, sdxl.vae, sdxl.text_encoder_1, sdxl.text_encoder_2):
        model.to(d.device).requires_grad_(False)
    if sdxl.vae.dtype != torch.float32:
        sdxl.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16
    sdxl.vae.eval()
    for model in (sdxl.unet, sdxl.text_encoder_1, sdxl.text_encoder_2):
        model.train()  # no dropout in SDXL; train mode turns gradient checkpointing on
    if tc["gradient_checkpointing"]:
        sdxl.unet.enable_gradient_checkpointing()
        if tc["train_text_encoders"]:
            for te in (sdxl.text_encoder_1, sdxl.text_encoder_2):
                te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    with torch.random.fork_rng(devices=[]):  # LyCORIS initialises w1 from the global RNG
        torch.manual_seed(hash64(tc["seed"], 0x10C4) >> 1)
        network = create_lokr(sdxl, cfg["lokr"], text_encoders=tc["train_text_encoders"])
    if cfg["lokr"]["init_from"] and resume is None:
        init_from_lokr(network, sdxl, cfg["lokr"]["init_from"])
    network.to(device=d.device, dtype=torch.float32)
    groups = lokr_param_groups(network, oc["lr_unet"], oc["lr_text"], oc["weight_decay"])
    optimizer = make_optimizer(groups, oc)
    scaler = torch.amp.GradScaler(d.device.type, enabled=tc["mixed_precision"] == "fp16")
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume loads warmed-up ones

    ec = cfg["ema"]
    ema = EMA(network, ec["decay"], ec["every"], d.device if ec["device"] == "gpu" else "cpu") \
        if ec["decay"] > 0 and d.is_main else None
    progress = Progress(started_at=metadata.training_start_time())
    if resume is not None:
        progress = _restore(cfg, d, index, resume, allow_config_change, sdxl, network, optimizer, scaler, ema)
    global_batch = tc["batch_size"] * d.world_size
    progress.plan_batch = progress.plan_batch or global_batch
    plan_accum = global_batch * tc["grad_accum"] // progress.plan_batch
    validation = Validation(cfg, index, buckets, bucket_rows, sdxl.noise_scheduler.config.num_train_timesteps)
    plan = BatchPlan(index, progress.plan_batch, tc["seed"], progress.epoch, buckets, bucket_rows,
                     validation.training_rows(), mixture.counts(tc["seed"], progress.epoch))
    steps_per_epoch = len(plan) // plan_accum  # the same every epoch of one folder: bucket sizes do not change
    if steps_per_epoch == 0:
        raise HakubooruError(f"{shards}: {len(index)} samples give {len(plan)} full batches of {global_batch} "
                             f"per epoch, fewer than one optimizer step ({tc['grad_accum']} batches)")
    total = tc["max_steps"] or tc["epochs"] * steps_per_epoch
    if mixture.mixed and not tc["max_steps"]:  # a mixed epoch's plan changes size a little from epoch to epoch
        total = sum(len(BatchPlan(index, progress.plan_batch, tc["seed"], e, buckets, bucket_rows,
                                  validation.training_rows(), mixture.counts(tc["seed"], e))) // plan_accum
                    for e in range(tc["epochs"]))
    base_hash = base_model_hash(cfg["model"]["pretrained"]) if d.is_main else ""  # for LoKr metadata
    if len(mixture.sources) > 1:
        if cfg["data"]["latent_cache"] == "require":
            raise HakubooruError("data.latent_cache = \"require\" with several --shards: a latent cache serves one "
                                 "shard folder; set data.latent_cache = \"off\" or train on one folder")
        cache = None
        tags = {}
        if d.is_main:
            for src, fp in zip(mixture.sources, mixture.fingerprints):
                for tag, n in ensure_tag_counts(src.path, fp).items():
                    tags[tag] = tags.get(tag, 0) + n
            tags = dict(sorted(tags.items(), key=lambda kv: -kv[1]))
    else:
        tags = metadata.tag_frequency(shards, index) if d.is_main else {}
        cache = open_cache(cfg, shards, index, sdxl.vae, log=d.is_main)
    return Run(cfg, d, Path(shards), Path(output), index, buckets, sdxl, network, optimizer, scaler,
               base_lrs, base_hash, tags, progress, total, steps_per_epoch, plan, cache, bucket_rows, ema,
               validation, mixture)


def _restore(cfg, d, index, resume, allow_config_change, sdxl, network, optimizer, scaler, ema) -> Progress:
    path, state = load_latest_state(state_dir(resume))
    if state["dataset_fingerprint"] != index.fingerprint:
        raise HakubooruError(f"{path} was written for another dataset (fingerprint {state['dataset_fingerprint'][:12]}…, "
                             f"these shards: {index.fingerprint[:12]}…); resume on the same --shards")
    saved_cfg = json.loads(state["config"])
    elastic = elastic_resume(path, state, saved_cfg, cfg, d.world_size)
    changed = check_resume_config(saved_cfg, cfg, allow_config_change, also_free=elastic.free_keys)
    lokr, _ = to_diffusers(state["lokr"], sdxl.unet)  # states keep diffusers-path names; accept either
    network.load_state_dict({k: v.to(d.device) for k, v in lokr.items()})
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if d.is_main:
        note = f" (config keys changed: {', '.join(changed)})" if changed else ""
        print(f"resuming from {path}: step {state['step']}, epoch {state['epoch']}, batch {state['cursor']}{note}",
              file=sys.stderr)
        if elastic.line:
            print(elastic.line, file=sys.stderr)
    return Progress(state["step"], state["epoch"], elastic.cursor, state["skipped"], state["nonfinite_in_row"],
                    state.get("started_at", metadata.training_start_time()), state.get("corrupt", 0),
                    elastic.plan_batch)


def state_payload(run: Run) -> dict:
    """What a training state holds (see docs/training.md); only tensors and plain values."""
    p, tc = run.progress, run.cfg["train"]
    return {
        "format": 1, "step": p.step, "micro_step": p.step * tc["grad_accum"], "epoch": p.epoch,
        "cursor": p.cursor, "skipped": p.skipped, "nonfinite_in_row": p.nonfinite_in_row, "corrupt": p.corrupt,
        "lokr": lokr_state_dict(run.network), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "config": config_json(run.cfg),
        "config_fingerprint": config_fingerprint(run.cfg), "dataset_fingerprint": run.index.fingerprint,
        "world_size": run.dist.world_size, "started_at": p.started_at, "plan_batch": p.plan_batch,
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
    }


def lokr_metadata(run: Run) -> dict:
    """Metadata strings stored in each LoKr file (trainers/lokr/network/metadata.py)."""
    p = run.progress
    return metadata.lokr_metadata(
        run.cfg, step=p.step, epoch=p.epoch, total_steps=run.total_steps, batches_per_epoch=len(run.current_plan),
        world_size=run.dist.world_size, num_train_images=len(run.index), dataset_dir="+".join(run.mixture.names()),
        tags=run.tags, started_at=p.started_at, base_model_sha256=run.base_model_hash,
        dataset_fingerprint=run.index.fingerprint, output_name=run.output.resolve().name,
        config_json=config_json(run.cfg),
        preset=lokr_preset(run.sdxl, run.cfg["lokr"], text_encoders=run.cfg["train"]["train_text_encoders"]),
        cache_latents=run.latent_cache is not None, prediction=prediction.of_scheduler(run.sdxl.noise_scheduler),
        captions_from=BatchDataset(run.shards, run.index, run.current_plan, **dataset_options(run.cfg)).captions_from())


def write_lokr(run: Run, path: Path) -> Path:
    """Save the run's LoKr to `path` with its metadata, in the configured naming and dtype."""
    lc = run.cfg["lokr"]
    meta = lokr_metadata(run)
    write_atomic(path.parent / metadata.PRESET_FILE, meta["lycoris_preset"].encode())  # ss_network_args' preset=
    if run.ema is not None:  # lokr-ema.safetensors beside lokr.safetensors, lokr-ema-N beside lokr-N
        with run.ema.applied(run.network):
            save_lokr(run.network, path.with_name(path.name.replace("lokr", "lokr-ema", 1)),
                      {**meta, "ema_decay": str(run.ema.decay), "ema_every": str(run.ema.every)},
                      unet=run.sdxl.unet, dtype=lc["save_dtype"], naming=lc["naming"])
    return save_lokr(run.network, path, meta, unet=run.sdxl.unet, dtype=lc["save_dtype"], naming=lc["naming"])


# ---------------------------------------------------------------- the loop

def train(cfg: dict, shards, output, *, resume=None, allow_config_change: bool = False) -> dict:
    """Train the LoKr of ``cfg`` on the shard folder ``shards``, writing LoKr checkpoints, training
    states and ``metrics.jsonl`` into ``output``; ``resume`` = a previous run's output folder.
    Returns a summary dict. SIGINT/SIGTERM write a state and return early."""
    run = setup(cfg, shards, output, resume=resume, allow_config_change=allow_config_change)
    try:
        return _loop(run)
    finally:
        shutdown(run.dist)


def micro_batch_loss(run: Run, batch: dict, micro_step: int, held_out: bool = False) -> torch.Tensor:
    """The min-SNR-weighted loss of one micro-batch (recipe §3–4), to ε or v as the base predicts;
    ``held_out``: a validation batch (its fixed draws, no caption dropout)."""
    sdxl, tc, device = run.sdxl, run.cfg["train"], run.dist.device
    scheduler = sdxl.noise_scheduler
    amp = dict(device_type=device.type, dtype=AMP_DTYPES[tc["mixed_precision"]], enabled=tc["mixed_precision"] != "no")
    cached = "latent_mean" in batch  # from the latent cache: no images, no VAE
    pixels = None if cached else batch["pixel_values"].to(device)
    latent_shape = tuple(batch["latent_mean"].shape[1:]) if cached else (
        sdxl.unet.config.in_channels, pixels.shape[2] // 8, pixels.shape[3] // 8)
    if held_out:
        draws = Draws(*run.validation.draws(batch["ids"], latent_shape, tc["noise_offset"]))
    else:
        draws = sample_draws(tc["seed"], micro_step, batch["ids"], latent_shape,
                             scheduler.config.num_train_timesteps, tc["noise_offset"])
    timesteps, noise = draws.timesteps.to(device), draws.noise.to(device)
    if cached:
        latents = cached_latents(batch, draws.latent_eps, sdxl.vae.config.scaling_factor, device)
    else:  # VAE in fp32, outside autocast, in sub-batches of data.vae_batch_size
        latents = encode_latents(sdxl.vae, pixels, draws.latent_eps, run.cfg["data"]["vae_batch_size"])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.autocast(**amp), torch.set_grad_enabled(tc["train_text_encoders"] and not held_out):
        captions = drop_captions(batch["captions"], batch["ids"], seed=tc["seed"], micro_step=micro_step,
                                 rate=0.0 if held_out else run.cfg["data"]["caption_dropout"])
        context, pooled = encode_prompts(sdxl, captions, max_windows=run.cfg["data"]["max_windows"])
    with torch.autocast(**amp):
        pred = sdxl.unet(noisy, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)}).sample
    weights = min_snr_weights(scheduler.alphas_cumprod.to(device), timesteps, tc["min_snr_gamma"],
                              scheduler.config.prediction_type)
    return diffusion_loss(pred, prediction.target(scheduler, latents, noise, timesteps), weights)


def validation_loss(run: Run) -> float:
    """The held-out loss (trainers/lokr/observe/validation.py): fixed draws, stored captions as
    they are, centre crops; every rank scores its share."""
    tc, dc = run.cfg["train"], run.cfg["data"]
    dataset = batch_dataset(run.latent_cache)(
        run.shards, run.index, run.validation.plan, rank=0, world_size=1, seed=tc["seed"], epoch=0,
        random_crop=False, shuffle_tags=False, tag_dropout=0.0, keep_tokens=dc["keep_tokens"],
        keep_separator=dc["keep_separator"] or None, on_corrupt=dc["on_corrupt"])
    return run.validation.loss(dataset, lambda batch: micro_batch_loss(run, batch, 0, held_out=True), run.dist)


def _loop(run: Run) -> dict:
    cfg, d, p = run.cfg, run.dist, run.progress
    tc, dc = cfg["train"], cfg["data"]
    accum, device = tc["grad_accum"], d.device
    optimizer, scaler = run.optimizer, run.scaler
    params = [q for g in optimizer.param_groups for q in g["params"]]
    kill_after = int(os.environ.get(KILL_AFTER_STATE_ENV, "-1"))
    images_per_step = run.global_batch * accum
    taken = np.zeros(len(run.mixture.sources), dtype=np.int64)  # samples trained this run, per --shards folder
    run.output.mkdir(parents=True, exist_ok=True)
    metrics_path = run.output / "metrics.jsonl"
    if d.is_main:
        _trim_metrics(metrics_path, p.step)
        if len(run.validation.rows):
            run.validation.write(run.output)
    scalars = ScalarLog(cfg, run.output, d.is_main, p.step)

    stop = {"signal": None}
    old_handlers = {}

    def request_stop(signum, _frame):  # finish this step, write a state, return; a second signal acts at once
        stop["signal"] = signal.Signals(signum).name
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    old_handlers.update({s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)})

    bar = tqdm(total=run.total_steps, initial=p.step, unit="step", disable=not d.is_main, dynamic_ncols=True)
    loss_value, start_step, start_time = float("nan"), p.step, time.perf_counter()
    val_loss = None
    saved = None  # the step of this run's last state
    try:
        while p.step < run.total_steps and stop["signal"] is None:
            if p.cursor >= run.usable(p.epoch):  # micro-steps trained per epoch; the leftover batches sit out
                p.epoch, p.cursor = p.epoch + 1, 0
            usable = run.usable(p.epoch)
            plan = run.rank_plan(p.epoch)
            dataset = batch_dataset(run.latent_cache)(run.shards, run.index, plan, rank=d.rank, world_size=d.world_size,
                                                      epoch=p.epoch, **dataset_options(run.cfg))
            batches = iter(make_loader(dataset, start=p.cursor, workers=dc["workers"]))
            while p.step < run.total_steps and p.cursor < usable:
                step_time = time.perf_counter()
                # loss sum, non-finite, stop, corrupt samples left out, micro-batches left empty by them
                totals = torch.zeros(5, dtype=torch.float64, device=device)
                for k in range(accum):
                    batch = next(batches)
                    totals[3] += batch["corrupt"]
                    if len(batch["ids"]) == 0:
                        totals[4] += 1
                        continue
                    loss = micro_batch_loss(run, batch, micro_step=run.draw_step(p.step, k))
                    if torch.isfinite(loss):
                        scaler.scale(loss / accum).backward()
                        totals[0] += loss.detach().double()
                    else:
                        totals[1] += 1
                totals[2] = stop["signal"] is not None
                all_reduce_sum(totals, d)  # one small collective per step: loss, non-finite count, stop
                all_reduce_grads(params, d)
                if d.is_main:
                    flat = run.plan(p.epoch).batches.reshape(-1)
                    rows = flat[p.cursor * run.global_batch:(p.cursor + accum) * run.global_batch]
                    taken += np.bincount(run.mixture.source_of[rows], minlength=len(taken))
                p.cursor += accum
                p.corrupt += int(totals[3])

                oc = cfg["optimizer"]
                factor = lr_factor(p.step, oc["warmup_steps"], oc["schedule"], run.total_steps, oc["cycles"])
                for group, base in zip(optimizer.param_groups, run.base_lrs):
                    group["lr"] = base * factor
                grad_norm = float("nan")
                if totals[1] > 0:
                    p.skipped += 1
                    p.nonfinite_in_row += 1
                    if p.nonfinite_in_row >= tc["max_nonfinite_in_row"]:
                        raise HakubooruError(f"loss was not finite for {p.nonfinite_in_row} steps in a row (at step "
                                             f"{p.step + 1}); lower the learning rate or try "
                                             "train.mixed_precision=bf16, then --resume from the last state")
                else:
                    p.nonfinite_in_row = 0
                    scaler.unscale_(optimizer)
                    if tc["max_grad_norm"] > 0:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"]))
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                p.step += 1
                if run.ema is not None and run.ema.due(p.step):
                    run.ema.update(run.network)

                finite_micro = d.world_size * accum - float(totals[1]) - float(totals[4])
                loss_value = float(totals[0]) / finite_micro if finite_micro else float("nan")
                images_per_s = images_per_step / (time.perf_counter() - step_time)
                line = {"step": p.step, "epoch": p.epoch, "loss": _finite_or_none(loss_value),
                        "lr_unet": group_lr(optimizer, "unet"), "lr_text": group_lr(optimizer, "text"),
                        "grad_norm": _finite_or_none(grad_norm), "images_per_s": images_per_s, "skipped": p.skipped}
                if run.validation.due(p.step, run.total_steps):
                    val_loss = validation_loss(run)
                    line["val_loss"] = _finite_or_none(val_loss)
                if d.is_main:
                    line_at = _append_line(metrics_path, line)
                    scalars.write(line)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}",
                                    img_s=f"{images_per_s:.2f}", refresh=False)
                    bar.update(1)
                if totals[2] > 0:
                    stop["signal"] = stop["signal"] or "a signal on another rank"
                    break
                # the step's files before its samples: a stop during the render finds them written
                if p.step % tc["checkpoint_every"] == 0 and d.is_main and p.step < run.total_steps:
                    write_lokr(run, run.output / f"lokr-{p.step:08d}.safetensors")
                if p.step % tc["save_every"] == 0 or p.step == run.total_steps:
                    _write_state(run, kill_after)
                    saved = p.step
                samples, stopping = sampling.maybe_render(run, p.step, lambda: stop["signal"] is not None)
                if samples and d.is_main:
                    _append_line(metrics_path, {**line, **samples}, at=line_at)  # the step's line, with them
                if stopping:
                    stop["signal"] = stop["signal"] or "a signal on another rank"
                    break
        if stop["signal"] is not None and saved != p.step:
            _write_state(run, kill_after)
    finally:
        bar.close()
        scalars.close()
        for s, handler in old_handlers.items():
            signal.signal(s, handler)

    final = None
    finished = p.step == run.total_steps  # also when a stop came during the last step's sample render
    if d.is_main and (stop["signal"] is None or finished):
        final = write_lokr(run, run.output / "lokr.safetensors")
    done = p.step - start_step
    summary = {"step": p.step, "epoch": p.epoch, "steps_this_run": done, "images_this_run": done * images_per_step,
               "skipped": p.skipped, "corrupt_skipped": p.corrupt, "loss": loss_value, "val_loss": val_loss,
               "interrupted_by": stop["signal"],
               "samples_per_source": {str(s.path): int(n) for s, n in zip(run.mixture.sources, taken)},
               "seconds": time.perf_counter() - start_time, "lokr": str(final) if final else None}
    if d.is_main:
        end = (f"stopped by {stop['signal']} at step {p.step}; resume with --resume {run.output}"
               if stop["signal"] and not finished else f"final LoKr {final}")
        if stop["signal"] and finished:
            end += f" (its sample render stopped by {stop['signal']})"
        corrupt = f", {p.corrupt} damaged samples left out" if p.corrupt else ""
        loss_note = f", last loss {loss_value:.4f}" if done else " (the run had already reached it)"
        if len(taken) > 1:
            loss_note += " (samples per --shards folder: " + ", ".join(
                f"{name} {int(n)}" for name, n in zip(run.mixture.names(), taken)) + ")"
        print(f"trained {done} steps ({done * images_per_step} images) to step {p.step}/{run.total_steps}, "
              f"{p.skipped} skipped (non-finite loss){corrupt}{loss_note}; {end}", file=sys.stderr)
    return summary


def group_lr(optimizer, name: str) -> float | None:
    """The current learning rate of the parameter group ``name`` ("unet" / "text"), if present."""
    return next((g["lr"] for g in optimizer.param_groups if g.get("name") == name), None)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def _write_state(run: Run, kill_after: int) -> None:
    if run.dist.is_main:
        save_state(state_dir(run.output), run.progress.step, state_payload(run), run.cfg["train"]["keep_states"])
    barrier(run.dist)
    if run.progress.step == kill_after:  # test hook: die the hardest way right after the write
        os.kill(os.getpid(), signal.SIGKILL)


def _append_line(path: Path, line: dict, at: int | None = None) -> int:
    """Append ``line`` to ``path`` as JSON, or write it over the file's last line, which starts at
    offset ``at``; returns the offset where it starts."""
    with open(path, "a" if at is None else "r+") as f:
        if at is not None:
            f.seek(at)
        start = f.tell()
        f.write(json.dumps(line) + "\n")
        f.truncate()
    return start


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (left by a run that died after its last state)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
