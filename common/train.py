"""The training loop all four scripts share: a paper file supplies a model, an optimizer and a loss; this file
does resume, mixed precision, DDP, EMA, logging, periodic samples and atomic checkpoints.
"""
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint, load_state_checked, rng_state, save_checkpoint, set_rng_state
from common.data import make_loader
from common.errors import UserError
from common.files import atomic_write, output_folder, release_locks
from common.run import EMA, Dist, RunLog, autocast, init_distributed, pick_precision, seed_everything


@dataclass
class Run:
    """Everything about where a run executes and writes: one per `train` command."""
    script: str
    dir: Path
    device: torch.device
    dtype: Optional[torch.dtype]    # autocast dtype, None = fp32
    dist: Dist
    compile: bool
    log: RunLog
    config_text: Optional[str] = None   # config.json as this command would write it (write_config)

    @classmethod
    def start(cls, script: str, config, *, preset: str, run_dir=None, device: str = "auto",
              precision: str = "auto", compile: bool = False, must_match: dict = None) -> "Run":
        """Set up devices and DDP, seed and create the run directory (default runs/<script>-<data>-<preset>), rank 0.
        A run directory that cannot be written, or that already holds checkpoints of another architecture
        (must_match), is refused before anything in it is rewritten; temporary files of killed writes are removed.
        config.json is written with the first checkpoint (write_config)."""
        world, dev = init_distributed(device)
        run_dir = Path(run_dir or f"runs/{script}-{config.data}-{preset}")
        if world.is_main:
            # made and tried with a write (a read-only disk fails here, not after training), locked against a
            # second `train`, killed writes' temporary files gone from it and from samples/
            output_folder(run_dir, nested=True, lock=True)
            check_run_dir(run_dir, must_match or {})
        seed_everything(config.seed + world.rank)
        text = json.dumps({"script": script, "preset": preset, **dataclasses.asdict(config)}, indent=2)
        return cls(script, run_dir, dev, pick_precision(precision, dev), world, compile, RunLog(run_dir, world.is_main),
                   text)

    def write_config(self):
        """config.json, written with each checkpoint (unchanged: not rewritten). By the first one, every checkpoint
        the command resumes or builds on has been loaded and checked against this config, so a command refused on
        the way (another --joint, a damaged checkpoint) leaves the run's config.json as it was."""
        saved = self.dir / "config.json"
        if self.config_text and (not saved.exists() or saved.read_text() != self.config_text):
            atomic_write(saved, lambda p: p.write_text(self.config_text))

    def checkpoint(self, stage: str) -> Path:
        """Where a stage's checkpoint lives: <run>/<stage>.pt."""
        return self.dir / f"{stage}.pt"

    def has(self, stage: str) -> bool:
        """Whether a stage has a checkpoint (finished or not) in this run."""
        return self.checkpoint(stage).exists()

    def print(self, *msg):
        if self.dist.is_main:
            tqdm.write(" ".join(str(m) for m in msg))


def run_command(args, **commands):
    """Run the sub-command `args.command` (train=..., sample=..., eval=...); the run folder a `train` locked is let
    go when it returns or fails, so the same process (a notebook, a test) may train that run again."""
    try:
        commands[args.command](args)
    finally:
        release_locks()


def check_run_dir(run_dir: Path, must_match: dict):
    """Refuse, in one sentence, to reuse a run directory whose checkpoints were trained with another architecture
    (its config.json says how they were made)."""
    saved = run_dir / "config.json"
    if not saved.exists() or not any(run_dir.glob("*.pt")):
        return
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        return          # an unreadable config.json: each checkpoint is still checked when it is loaded
    for key, value in must_match.items():
        if before.get(key) != json.loads(json.dumps(value)):       # as config.json stores it (tuples as lists)
            raise UserError(f"{run_dir} was trained with {key}={before.get(key)!r} but the config asks for {value!r}: "
                            f"use the same preset/flags, or a new --run directory")


def continue_rng(run: Run, stages: Sequence[str], seed: int):
    """Continue the RNG stream saved by the last of `stages` that has a checkpoint (none has: change nothing). A
    stage that starts afresh does, and a script does before it builds a stage's new modules, so that a stage run in
    a command of its own, or again after a kill, draws what one uninterrupted `train` draws."""
    before = [name for name in stages if run.has(name)]
    if before:
        previous = load_checkpoint(run.checkpoint(before[-1]), run.script, mmap=True, entries=("rng",))
        _restore_rng(run, previous["rng"], seed, previous["step"])


def _restore_rng(run: Run, state: dict, seed: int, step: int):
    """Rank 0 continues the RNG stream saved in a checkpoint; other ranks draw their own noise, from a seed made of
    (seed, rank, step)."""
    if run.dist.is_main:
        set_rng_state(state)
    else:
        seed_everything(seed * 1_000_003 + run.dist.rank * 1009 + step)


def keep_asked_settings(optimizer: torch.optim.Optimizer, asked: list) -> dict:
    """Give each param group back the hyperparameters this command built the optimizer with (`asked`: lr, betas,
    weight_decay, ...), which load_state_dict replaced with the checkpoint's; returns {name: [saved, asked]} of
    those that differ ({} when nothing changed: the resumed run stays bit-exact).

    A changed --lr on resume is applied rather than refused: lowering the rate of a run that has stopped improving
    is an ordinary step, and the state Adam keeps (the gradients' moments and the step count) does not depend on
    the rate, so it carries over unchanged. The change is logged at the step it takes effect (train_stage), and
    config.json and the checkpoint then name the rate that runs. (nanoGPT's train.py sets each group's lr every
    iteration, so its resumed runs likewise train at the rate they are given.)"""
    def plain(v):                               # a tuple saved in a checkpoint may come back a list
        return list(v) if isinstance(v, (tuple, list)) else v

    changed = {}
    for group, wanted in zip(optimizer.param_groups, asked):
        for key, value in wanted.items():
            if plain(group.get(key)) != plain(value):
                changed.setdefault(key, [plain(group.get(key)), plain(value)])
                group[key] = value
    return changed


def _to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_stage(run: Run, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable, dataset, *, steps: int, batch_size: int, config, must_match: dict,
                seed: int = 0, ema_decay: Optional[float] = None, grad_clip: Optional[float] = None,
                sample_fn: Optional[Callable] = None, sample_every: int = 0, save_every: int = 0,
                log_every: int = 10, find_unused_parameters: bool = False, accumulate: int = 1,
                clip_params: Optional[Callable] = None, follows: Sequence[str] = ()) -> torch.nn.Module:
    """Train `model` for `steps` optimizer steps on `dataset`, resuming from <run>/<stage>.pt if it exists.

    loss_fn(net, batch) returns the loss, or a dict with "loss" and other scalars to log; `net` is the model as
    wrapped for training (DDP, compile), batch a dict of tensors on the device. Returns the EMA model when
    ema_decay is set, else the model. A stage whose checkpoint has reached `steps` is skipped, its RNG state restored.
    A resumed stage keeps its optimizer's state but trains with the hyperparameters `optimizer` was built with
    (another --lr is applied and logged: keep_asked_settings).
    Each optimizer step accumulates the gradients of `accumulate` batches. grad_clip clips the norm of
    clip_params(model) (default: all parameters). A stage that starts afresh continues the RNG stream saved by the
    last stage of `follows` that has a checkpoint (continue_rng), so stages run one command at a time draw what one
    `train` would have drawn.
    Under DDP, gradients are synchronised only for what loss_fn computes through `net`; a model whose steps
    leave some parameters without a gradient (a GAN's alternating updates) needs find_unused_parameters.
    """
    ckpt_path = run.checkpoint(stage)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    ema = EMA(model, ema_decay) if ema_decay else None
    step = samples = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, run.script, must_match, map_location=run.device)
        load_state_checked(model, ckpt["model"], ckpt_path)
        asked = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])    # also restores the saved lr, betas, ...: put back `asked`
        scaler.load_state_dict(ckpt["scaler"])
        if ema:
            ema.load_state_dict(ckpt["ema"], f"{ckpt_path} (EMA)")
        step, samples, resume_rng = ckpt["step"], ckpt["samples"], ckpt["rng"]
        if step >= steps:
            run.print(f"{stage}: finished at step {step} ({ckpt_path}); skipping")
            _restore_rng(run, resume_rng, seed, step)   # what follows draws what it drew after this stage trained
            return (ema.model if ema else model).eval()
        run.print(f"{stage}: resuming from step {step} ({ckpt_path})")
        run.log.forget_after(stage, step)
        changed = keep_asked_settings(optimizer, asked)
        if changed:
            run.log.write(stage=stage, step=step, changed=changed)
            run.print(f"{stage}: from step {step} on, " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in
                                                                    changed.items()))
    else:
        continue_rng(run, follows, seed)
        run.log.forget_after(stage, 0)     # lines of a run killed before this stage's first checkpoint

    def save():
        if run.dist.is_main:
            run.write_config()
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                **({"ema": ema.state_dict()} if ema else {}), "step": step, "samples": samples,
                "config": dataclasses.asdict(config), "script": run.script, "stage": stage, "rng": rng_state()})

    net = model
    if dist.is_initialized():      # torchrun, with one process or more
        net = DistributedDataParallel(model, device_ids=[run.device] if run.device.type == "cuda" else None,
                                      find_unused_parameters=find_unused_parameters)
    if run.compile:
        net = torch.compile(net)
    loader = make_loader(dataset, batch_size, seed=seed, start=samples, rank=run.dist.rank, world=run.dist.world)
    if step > 0:   # restored last: building the loader above draws from the global RNG
        _restore_rng(run, resume_rng, seed, step)
    model.train()
    # closed however the loop ends: an error printed after it then starts a line of its own
    with tqdm(total=steps, initial=step, desc=stage, disable=not run.dist.is_main, dynamic_ncols=True) as bar:
        waited = busy = 0.0   # seconds spent in next(loader), and in whole steps, since the last log line
        while step < steps:
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            totals = {}
            for _ in range(accumulate):
                fetch = time.perf_counter()
                batch = next(loader)
                waited += time.perf_counter() - fetch   # > 0 only when the loader's workers fall behind the step
                batch = _to_device(batch, run.device)
                with autocast(run.device, run.dtype):
                    out = loss_fn(net, batch)
                out = out if isinstance(out, dict) else {"loss": out}
                scaler.scale(out["loss"] / accumulate).backward()
                for k, v in out.items():   # the step's scalars are means over its batches
                    totals[k] = totals.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / accumulate
            if grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(list(clip_params(model) if clip_params else model.parameters()),
                                               grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema:
                ema.update(model)
            step += 1
            samples += batch_size * accumulate * run.dist.world
            busy += time.perf_counter() - began
            if step % log_every == 0 or step == steps:
                logged = {k: float(v) for k, v in totals.items()}
                if run.dist.world > 1:   # the mean over ranks, so the log does not depend on the world size
                    vals = torch.tensor(list(logged.values()), device=run.device)
                    dist.all_reduce(vals)
                    logged = dict(zip(logged, (vals / run.dist.world).tolist()))
                # data_wait: this rank's share of the steps' time spent waiting for batches (0 = data keeps up)
                data_wait = waited / busy if busy > 0 else 0.0
                waited = busy = 0.0
                run.log.write(stage=stage, step=step, **logged, lr=optimizer.param_groups[0]["lr"],
                              data_wait=round(data_wait, 4))
                bar.set_postfix(loss=f"{logged['loss']:.4f}", data=f"{data_wait:.0%}")
            bar.update(1)
            if save_every and step % save_every == 0 and step < steps:
                save()
            if sample_fn and sample_every and step % sample_every == 0 and run.dist.is_main:
                target = ema.model if ema else model
                target.eval()
                with torch.no_grad(), autocast(run.device, run.dtype):
                    sample_fn(target, step)
                model.train()
    save()
    if run.dist.world > 1:   # every rank waits for rank 0's checkpoint: the next stage may load it
        dist.barrier()
    return (ema.model if ema else model).eval()
