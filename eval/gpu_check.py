"""The CUDA path of every script, checked in one command within a time budget.

    python -m eval.gpu_check                        # one CUDA GPU, the paper presets, 8 minutes
    python -m eval.gpu_check --budget-minutes 12 --only pvdm vdm
    python -m eval.gpu_check --device cpu --tiny    # the same items at the tiny presets (CI: the check itself)

For each script at its paper preset (pvdm ucf256, lvdm ucf256, vqvdm ucf128, videofusion ucf64, vdm ucf256 = the
ucf64 base + SR), through the script's own command line on synthetic clips at the preset's shape and batch, in bf16:
  train STAGE     10 optimizer steps of each stage in turn (the first builds the networks; the last stage's
                  `train` also writes its final samples, as a user's does)
  resume+compile  one stage again, right after its first 10 steps, to 20 steps with --compile: its checkpoint
                  loaded (weights, optimizer state, step), the training graph compiled. The denoiser's stage where
                  it is not the last (lvdm short, vdm base, vqvdm diffusion); PVDM's autoencoder and VideoFusion's
                  base generator, since their denoisers train last and a `train` of the last stage writes the final
                  samples again (one item, not two, for the same reason)
  sample          `sample` at the preset's frames and resolution, one video, few steps (PVDM: Table 5's 100/20-s,
                  timed against the 1.5 s goal)
then the tests marked gpu, and `torchrun --nproc_per_node=1` (NCCL on a GPU, gloo on a CPU) of vqvdm's autoencoder
stage, whose codebook also all-reduces. On a CPU the precision is fp32 and --compile uses the eager backend
(dynamo's graph capture, without inductor's minutes of C++ code generation on 2 cores), and samples take 4 steps.

One line per item: passed, or the error (an item whose needs failed is skipped), its seconds, the median
seconds per optimizer step after two (the first warms up, the second is counted), the peak GiB allocated, the
achieved TFLOP/s of a step and its MFU against the card's dense bf16 peak (eval.efficiency.PEAK_TFLOPS; n/a on a CPU
or an unknown card), and what was checked. A step's FLOPs: every outermost module call of the second step, replayed
on the meta device and counted by eval.efficiency.count_gflop, x3 where it ran with gradients into trainable weights
(backward ~ 2 x forward), x1 where it did not (a frozen encoder); work outside modules and gradient checkpointing's
recomputation are not counted, so the MFU is a floor. The goals of issue 28 follow the table: every denoiser's bf16
step above 35 % MFU on an H100/H200, PVDM's 16x256^2 100/20-s sample under 1.5 s.

Each script runs in a process of its own (a crash or a hung kernel ends that process, not the check). Each script
gets a share of the budget by its items' weights (time a script left unused passes on); inside it an item may take
all of the script's time but a floor kept for each item after it (MIN_SHARE_S), since a stage stopped short
leaves the stages after it nothing to start from (weighted shares inside a script starved the first stage of
every paper preset on the first H200 run: cuDNN's autotuning and the first steps ate them). The table of what ran
is always printed, also after Ctrl-C. lvdm trains without LPIPS (--lpips-weight 0): its VGG-16 weights cannot be
fetched on a GPU machine with no network, and a paper preset refuses to train without them.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from common.cli import Parser, main, number
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
GiB = 2 ** 30
STEPS = 10                      # optimizer steps per stage
MFU_GOAL = 0.35                 # issue 28: every denoiser's bf16 training step
PVDM_SAMPLE_GOAL_S = 1.5        # issue 28: PVDM-L, one 16x256^2 video at 100/20-s


@dataclass
class Script:
    name: str
    preset: str
    stages: tuple                   # (stage, the flag of its steps), in `train`'s order
    denoiser: str                   # the denoiser's stage (its MFU is measured against the goal)
    compiled: str                   # the stage resumed and compiled
    sample: tuple = ()              # sample flags beside --n 1 --steps
    sample_steps: int = 4
    train_flags: tuple = ()         # beside the preset, for every train command


SCRIPTS = [
    Script("pvdm", "ucf256", (("ae", "--ae-steps"), ("gan", "--gan-steps"), ("diffusion", "--steps")), "diffusion",
           "ae", ("--frames", "16", "--cond-steps", "20"), 100),
    Script("lvdm", "ucf256", (("ae", "--ae-steps"), ("short", "--steps"), ("pred", "--pred-steps"),
                              ("interp", "--interp-steps")), "short", "short",
           train_flags=("--lpips-weight", "0")),
    Script("vqvdm", "ucf128", (("ae", "--ae-steps"), ("diffusion", "--steps")), "diffusion", "diffusion"),
    Script("videofusion", "ucf64", (("base-pretrain", "--base-steps"), ("diffusion", "--steps")), "diffusion",
           "base-pretrain"),
    Script("vdm", "ucf256", (("base", "--steps"), ("sr", "--sr-steps")), "base", "base"),
]
GROUPS = [s.name for s in SCRIPTS] + ["tests", "torchrun"]
# shares of the budget; a `train` of a script's last stage also writes its final samples (FINAL more)
WEIGHTS = {"train": 1.0, "compile": 2.0, "sample": 0.5, "tests": 2.0, "torchrun": 1.5}
FINAL = 1.5
MIN_SHARE_S = {"train": 5.0, "compile": 20.0, "sample": 5.0, "tests": 10.0, "torchrun": 10.0}


@dataclass
class Item:
    name: str                       # "pvdm train ae"
    kind: str                       # a key of WEIGHTS
    stage: str = ""
    needs: tuple = ()               # names of the items it builds on
    final: bool = False             # a `train` that ends with the script's final samples
    # filled in by the run
    result: str = "not run"         # passed | error | stopped | skipped | not run
    detail: str = ""
    seconds: Optional[float] = None
    step_s: Optional[float] = None
    peak_gib: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    gflop_per_step: Optional[float] = None
    denoiser: bool = False


@dataclass
class Plan:
    device: str                     # cuda | cpu
    tiny: bool
    work: str                       # a folder for the runs
    budget_s: float

    @property
    def precision(self) -> str:
        return "fp32" if self.device == "cpu" else "bf16"


def script_items(s: Script) -> list:
    names = [f"{s.name} train {stage}" for stage, _ in s.stages]
    last = s.stages[-1][0]
    items = [Item(name, "train", stage, tuple(names[:k]), stage == last, denoiser=stage == s.denoiser)
             for k, (name, (stage, _)) in enumerate(zip(names, s.stages))]
    at = [stage for stage, _ in s.stages].index(s.compiled) + 1           # right after the stage's first steps
    compiled = Item(f"{s.name} resume+compile {s.compiled}", "compile", s.compiled, (names[at - 1],),
                    s.compiled == last, denoiser=s.compiled == s.denoiser)
    return items[:at] + [compiled] + items[at:] + [Item(f"{s.name} sample", "sample", "", tuple(names))]


def weight(item: Item) -> float:
    return WEIGHTS[item.kind] + (FINAL if item.final else 0.0)


def share_of(left: float, weights: list) -> float:
    """The seconds the first of some items (or groups) may take of the `left` ones: its weight's part, plus half of
    what the later ones' weights would give them, so that a slow item borrows from those after it while each of
    them keeps at least half of its part; the last one takes all that is left."""
    return left * (weights[0] + 0.5 * sum(weights[1:])) / sum(weights)


# --- In the process of one script: its items, measured ---

class ItemTimeout(Exception):
    pass


def stop_item(signum, frame):
    raise ItemTimeout


class Meter:
    """Times between the steps of the first optimizer that steps, and the module calls of its second step: each call
    of an nn.Module, with its depth (calls inside calls), the shapes of its inputs and whether it ran with gradients
    into trainable weights."""

    def __init__(self, device: torch.device, count: bool):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self.device, self.count, self.optimizer, self.times, self.calls, self.depth = device, count, None, [], [], 0
        self.hooks = [register_optimizer_step_post_hook(self.stepped)]

    def stepped(self, optimizer, args, kwargs):
        if self.optimizer is None:
            self.optimizer = optimizer
        if optimizer is not self.optimizer:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        if self.count and len(self.times) == 1:         # the second step starts: watch its module calls
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
            self.module_hooks = [register_module_forward_pre_hook(self.enter), register_module_forward_hook(self.exit)]
        elif self.count and len(self.times) == 2:
            self.unwatch()

    def enter(self, module, args):
        if torch._C._current_graph_task_id() == -1:     # not a recomputation inside backward (checkpointing)
            trained = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
            self.calls.append((self.depth, module, torch.utils._pytree.tree_map(as_meta, args), 3 if trained else 1))
        self.depth += 1

    def exit(self, module, args, out):
        self.depth -= 1

    def unwatch(self):
        for hook in getattr(self, "module_hooks", []):
            hook.remove()
        self.module_hooks = []

    def close(self):
        self.unwatch()
        for hook in self.hooks:
            hook.remove()

    def step_s(self) -> Optional[float]:
        """The median time of the steps after the second (the first warms up and compiles, the second is watched)."""
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:])]
        return statistics.median(gaps) if gaps else None

    def gflop(self) -> tuple:
        """(GFLOP, names of modules left out) of the second step: each outermost call replayed on the meta device
        (no weights are copied). A call that cannot run there (a Python branch on a value, .item()) is replaced by
        the calls it made; one that made none is left out (a codebook's bookkeeping, say) and named."""
        from eval.efficiency import count_gflop
        left_out = set()

        def replay(k: int) -> float:
            depth, module, args, factor = self.calls[k]
            try:
                state = {name: as_meta(t) for name, t in (*module.named_parameters(), *module.named_buffers())}
                return factor * count_gflop(lambda: torch.func.functional_call(module, state, args))
            except Exception:
                inner = [j for j in range(k + 1, self.end(k)) if self.calls[j][0] == depth + 1]
                if not inner:
                    left_out.add(type(module).__name__)
                return sum(replay(j) for j in inner)
        outermost = [k for k, call in enumerate(self.calls) if call[0] == 0]
        return (sum(replay(k) for k in outermost) if outermost else None), sorted(left_out)

    def end(self, k: int) -> int:
        """The index after the last call made inside call k."""
        j = k + 1
        while j < len(self.calls) and self.calls[j][0] > self.calls[k][0]:
            j += 1
        return j


def as_meta(x):
    """A tensor's shape on the meta device, float32 where it is floating (bf16 inputs meet fp32 weights outside
    autocast); anything else as it is."""
    if not torch.is_tensor(x):
        return x
    return torch.empty(x.shape, dtype=torch.float32 if x.is_floating_point() else x.dtype, device="meta")


def run_script_items(spec: dict):
    """The items of one script, in this process (a child of `run`): each line of results is appended to
    spec["results"] as the item ends."""
    import importlib

    from eval.efficiency import peak_tflops
    plan, script = Plan(**spec["plan"]), next(s for s in SCRIPTS if s.name == spec["script"])
    items = [Item(**i) for i in spec["items"]]
    module = importlib.import_module(script.name)
    device = torch.device(plan.device)
    preset = "tiny" if plan.tiny else script.preset
    run_dir = Path(plan.work) / script.name
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = peak_tflops(card, torch.bfloat16) if device.type == "cuda" else None
    flops = {}
    deadline = spec["deadline"]
    for k, item in enumerate(items):
        failed = [n for n in item.needs if n in spec["failed"]]
        if failed:
            item.result, item.detail = "skipped", f"needs {failed[0]}"
        else:
            floors = sum(MIN_SHARE_S[i.kind] for i in items[k + 1:])
            share = max(1.0, deadline - time.time() - floors)
            measure(item, script, module, plan, preset, run_dir, device, share, flops, peak)
        if item.result != "passed":
            spec["failed"].append(item.name)
        with open(spec["results"], "a") as f:
            f.write(json.dumps(asdict(item)) + "\n")


def train_argv(script: Script, plan: Plan, preset: str, run_dir: Path, stage: str, steps: dict) -> list:
    argv = ["train", "--preset", preset, "--data", "synthetic", "--run", str(run_dir), "--stage", stage,
            "--device", plan.device, "--precision", plan.precision, "--save-every", "0", "--sample-every", "0"]
    for name, flag in script.stages:
        argv += [flag, str(steps.get(name, STEPS))]
    return argv + list(script.train_flags)


def measure(item: Item, script: Script, module, plan: Plan, preset: str, run_dir: Path, device: torch.device,
            share: float, flops: dict, peak: Optional[float]):
    """Run one item under an alarm at `share` seconds, and fill in its result and numbers."""
    meter = Meter(device, count=item.kind == "train")
    compile_ = torch.compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    handler = signal.signal(signal.SIGALRM, stop_item)
    signal.setitimer(signal.ITIMER_REAL, share)
    try:
        item.detail = run_item(item, script, module, plan, preset, run_dir, device)
        item.result = "passed"
    except ItemTimeout:
        item.result = "stopped"
        item.detail = f"at its share of the budget, {share:.3g} s, after {len(meter.times)} steps"
    except UserError as e:
        item.result, item.detail = "error", f"error: {e}"
    except Exception as e:
        item.result, item.detail = "error", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        traceback.print_exc()           # to the script's log, beside the results
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        torch.compile = compile_
        meter.close()
    item.seconds = round(time.perf_counter() - start, 2)
    step_s = meter.step_s()
    item.step_s = step_s and float(f"{step_s:.4g}")
    if device.type == "cuda":
        item.peak_gib = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
    if item.kind == "train" and meter.calls:
        flops[item.stage], left_out = meter.gflop()
        if left_out:
            item.detail += f"; FLOPs without {', '.join(left_out)}"
    item.gflop_per_step = flops.get(item.stage) if item.kind in ("train", "compile") else None
    if item.gflop_per_step and step_s:
        item.tflops = float(f"{item.gflop_per_step / step_s / 1e3:.4g}")
        item.mfu = round(item.tflops / peak, 3) if peak else None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_item(item: Item, script: Script, module, plan: Plan, preset: str, run_dir: Path,
             device: torch.device) -> str:
    """Run the item through the script's command line; what was checked, in words."""
    if item.kind == "train":
        module.cli(train_argv(script, plan, preset, run_dir, item.stage, {}))
        return f"{STEPS} steps at {preset}"
    if item.kind == "compile":
        to = 2 * STEPS
        if device.type == "cpu":        # graph capture without inductor's C++ compile (module docstring)
            torch.compile = lambda fn, **kw: COMPILE(fn, **{**kw, "backend": "eager"})
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        module.cli([*train_argv(script, plan, preset, run_dir, item.stage, {item.stage: to}), "--compile"])
        step = torch.load(run_dir / f"{item.stage}.pt", map_location="cpu", weights_only=True, mmap=True)["step"]
        logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in logged if r.get("stage") == item.stage]
        if step != to or steps != [STEPS, to]:          # log_every is 10: one line at step 10, one at 20
            raise RuntimeError(f"resumed to step {step} with log lines at steps {steps}, not {to} after {STEPS}")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if not graphs:
            raise RuntimeError("--compile compiled no graph")
        return (f"from step {STEPS} to {to}, {graphs} graph(s) compiled"
                f"{' (eager backend)' if device.type == 'cpu' else ''}")
    # sample: the script's `sample`, its generate timed
    generate, timed = module.generate, []
    steps = 4 if plan.tiny else script.sample_steps

    def timing(*args, **kwargs):
        begin = time.perf_counter()
        out = generate(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed.append(time.perf_counter() - begin)
        return out
    module.generate = timing
    out = run_dir / "samples" / "gpu_check"
    try:
        module.cli(["sample", "--run", str(run_dir), "--n", "1", "--steps", str(steps), "--out", str(out),
                    "--device", plan.device, "--precision", plan.precision, *script.sample])
    finally:
        module.generate = generate
    import numpy as np
    shape = "x".join(map(str, np.load(out / "samples.npz")["videos"].shape[1:4]))
    text = f"{shape} video, {steps} steps, generate {sum(timed):.3g} s"
    if script.name == "pvdm" and not plan.tiny:
        text += f" (goal {PVDM_SAMPLE_GOAL_S} s)"
    return text


COMPILE = torch.compile


# --- The tests marked gpu, and torchrun ---

def gpu_test_files() -> list:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "@pytest.mark.gpu" in p.read_text())


def child_env(plan: Plan) -> dict:
    """The environment of the check's processes: the repository importable, and on a CPU OpenMP threads that sleep
    while they wait (spinning ones hold the core another process needs: on a busy 2-core machine a tiny training
    step took 10 s instead of 0.3; eval.efficiency does the same). A user's own setting wins."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if plan.device == "cpu":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_command(item: Item, argv: list, share: float, log: Path, plan: Plan) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    try:
        with open(log, "a") as f:
            done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, timeout=share,
                                  env=child_env(plan))
    except subprocess.TimeoutExpired:
        item.result, item.detail = "stopped", f"at its share of the budget, {share:.3g} s"
        done = None
    item.seconds = round(time.perf_counter() - start, 2)
    return done


def run_tests(item: Item, plan: Plan, share: float, log: Path):
    files = gpu_test_files()
    done = run_command(item, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                       share, log, plan)
    if done is not None:
        summary = (done.stdout.strip().splitlines() or [""])[-1].strip("= ")
        item.result = "passed" if done.returncode == 0 else "error"
        item.detail = f"{len(files)} files: {summary}"


def run_torchrun(item: Item, plan: Plan, share: float, log: Path):
    script = next(s for s in SCRIPTS if s.name == "vqvdm")
    run_dir = Path(plan.work) / "torchrun"
    argv = train_argv(script, plan, "tiny" if plan.tiny else script.preset, run_dir, "ae", {})
    done = run_command(item, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              "--", "vqvdm.py", *argv], share, log, plan)
    if done is not None:
        ok = done.returncode == 0 and (run_dir / "ae.pt").exists()
        item.result = "passed" if ok else "error"
        backend = "NCCL" if plan.device == "cuda" else "gloo"
        item.detail = (f"vqvdm ae, {STEPS} steps, DDP over {backend}" if ok else
                       f"exit status {done.returncode}: {last_error(log)}")


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].strip()[:200]


# --- The whole check ---

def run_group(group: str, items: list, plan: Plan, deadline: float, failed: list):
    """One group's items: a script's in a process of its own (killed past the deadline + 30 s: an alarm cannot
    interrupt a kernel or a compile that never returns to Python), the tests and torchrun as commands."""
    log = Path(plan.work) / f"{group}.log"
    share = max(1.0, deadline - time.time())
    if group == "tests":
        return run_tests(items[0], plan, share, log)
    if group == "torchrun":
        return run_torchrun(items[0], plan, share, log)
    results = Path(plan.work) / f"{group}.jsonl"
    spec = {"plan": asdict(plan), "script": group, "items": [asdict(i) for i in items], "deadline": deadline,
            "failed": failed, "results": str(results)}
    code = "import json, sys; from eval.gpu_check import run_script_items; run_script_items(json.loads(sys.argv[1]))"
    with open(log, "a") as f:
        child = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, stdout=f, stderr=f,
                                 env=child_env(plan))
        try:
            child.wait(timeout=share + 30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        except BaseException:
            child.kill()
            raise
    done = {}
    if results.exists():
        done = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
    for item in items:
        if item.name in done:
            for key, value in done[item.name].items():
                setattr(item, key, value)
        elif item.result == "not run":
            item.result = "stopped" if child.returncode in (-9, None) else "error"
            item.detail = ("the process was killed past its share of the budget" if item.result == "stopped" else
                           f"the process ended (status {child.returncode}): {last_error(log)}")
        if item.result != "passed":
            failed.append(item.name)


def plan_groups(only: Optional[list]) -> list:
    groups = []
    for name in only or GROUPS:
        script = next((s for s in SCRIPTS if s.name == name), None)
        groups.append((name, script_items(script) if script else [Item(name, name)]))
    return groups


def table(plan: Plan, groups: list, wall: float) -> str:
    card = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    lines = [f"gpu_check on {card}, torch {torch.__version__}, {'tiny' if plan.tiny else 'paper'} presets, "
             f"{plan.precision}; {wall:.0f} s of a {plan.budget_s:.0f} s budget",
             "| item | result | s | step s | peak GiB | TFLOP/s | MFU | checked |", "|---|---|---|---|---|---|---|---|"]
    for _, items in groups:
        for i in items:
            lines.append(f"| {i.name} | {i.result} | {fmt(i.seconds)} | {fmt(i.step_s)} | {fmt(i.peak_gib)} | "
                         f"{fmt(i.tflops)} | {fmt(i.mfu, percent=True)} | {i.detail.replace('|', '/')} |")
    lines += goals(plan, [i for _, items in groups for i in items])
    return "\n".join(lines)


def goals(plan: Plan, items: list) -> list:
    """The gaps to issue 28's goals, on a GPU at the paper presets."""
    if plan.device != "cuda" or plan.tiny:
        return []
    out = []
    for i in items:
        if i.denoiser and i.kind in ("train", "compile") and i.mfu is not None:
            gap = "reached" if i.mfu >= MFU_GOAL else f"{(MFU_GOAL - i.mfu) * 100:.0f} points short"
            out.append(f"goal: {i.name} at {i.mfu:.1%} MFU against {MFU_GOAL:.0%}: {gap}")
    sample = next((i for i in items if i.name == "pvdm sample" and i.result == "passed"), None)
    if sample:
        seconds = float(sample.detail.split("generate ")[1].split(" s")[0])
        out.append(f"goal: PVDM 16x256^2 100/20-s sample in {seconds:.3g} s against {PVDM_SAMPLE_GOAL_S} s: "
                   f"{'reached' if seconds <= PVDM_SAMPLE_GOAL_S else f'{seconds / PVDM_SAMPLE_GOAL_S:.1f}x too slow'}")
    return out


def fmt(x, percent=False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" if percent else f"{x:g}"


def parser():
    p = Parser(prog="python -m eval.gpu_check", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where to run (default: auto, i.e. CUDA; a CPU needs --tiny)")
    p.add_argument("--tiny", action="store_true", help="the tiny presets instead of the papers' (a CPU needs it)")
    p.add_argument("--budget-minutes", type=number(float, lo=0, lo_open=True), default=8.0,
                   help="the whole check's time; each item stops at its share (default: 8)")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=None,
                   help="run only these scripts' items (and/or tests, torchrun) (default: all)")
    return p


def run(argv=None):
    args = parser().parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu --tiny")
    if device == "cpu" and not args.tiny:
        raise UserError("no CUDA GPU is visible and the paper presets take hours a step on a CPU: pass --device cpu "
                        "--tiny to check the script itself")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        plan = Plan(device, args.tiny, work, args.budget_minutes * 60)
        groups, failed = plan_groups(args.only), []
        weights = [sum(map(weight, items)) for _, items in groups]
        try:
            for k, (name, items) in enumerate(groups):
                left = plan.budget_s - (time.time() - start)
                deadline = time.time() + max(1.0, share_of(left, weights[k:]))
                print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
                run_group(name, items, plan, deadline, failed)
                for i in items:
                    print(f"gpu_check: {i.name}: {i.result} {i.detail}", file=sys.stderr, flush=True)
        finally:
            print(table(plan, groups, time.time() - start), flush=True)
            logs = [p for p in Path(work).glob("*.log") if p.stat().st_size]
            if failed and logs:
                kept = Path(tempfile.mkdtemp(prefix="gpu_check-logs-"))
                for p in logs:
                    shutil.copy(p, kept)
                print(f"gpu_check: the processes' output is in {kept}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main(run)
