"""The smallest script that keeps the contract: a one-layer 3D-conv eps-predictor on synthetic video, trained
and sampled through common/. The run-plumbing tests drive it in-process and under torchrun."""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.checkpoint import config_from_checkpoint, find_checkpoint, load_checkpoint, load_state_checked  # noqa: E402
from common.cli import build_parser, config_from_args, flag, main  # noqa: E402
from common.data import DATASETS, make_dataset  # noqa: E402
from common.diffusion import Schedule, ddim_sample  # noqa: E402
from common.run import pick_device  # noqa: E402
from common.train import Run, train_stage  # noqa: E402
from common.video import to_uint8, write_samples  # noqa: E402

SCRIPT = "toy"


@dataclass
class Config:
    data: str = flag("synthetic", "dataset", choices=list(DATASETS))
    data_root: str = flag(None, "dataset folder")
    steps: int = flag(6, "diffusion training steps")
    batch_size: int = flag(2, "clips per step and process", lo=1)
    lr: float = flag(1e-2, "learning rate")
    seed: int = flag(0, "random seed")
    sample_every: int = flag(0, "write a sample GIF every N steps (0: never)")
    save_every: int = flag(2, "checkpoint every N steps")
    width: int = 8
    frames: int = 4
    resolution: int = 8


PRESETS = {"tiny": Config(), "wide": Config(width=16)}


class Toy(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp, self.out = nn.Conv3d(3, width, 3, padding=1), nn.Conv3d(width, 3, 3, padding=1)

    def forward(self, x, t):
        return self.out(F.silu(self.inp(x) + t.float().reshape(-1, 1, 1, 1, 1) / 1000))


def train(args):
    cfg = config_from_args(Config, PRESETS, args)
    run = Run.start(SCRIPT, cfg, preset=args.preset, run_dir=args.run, device=args.device,
                    precision=args.precision, compile=args.compile, must_match={"width": cfg.width})
    sched = Schedule.make("linear", 100)
    model = Toy(cfg.width).to(run.device)

    def loss_fn(net, batch):
        x0 = batch["video"]
        t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(net(sched.q_sample(x0, t, noise), t), noise)

    data = make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution, seed=cfg.seed)
    train_stage(run, "diffusion", model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), loss_fn, data,
                steps=cfg.steps, batch_size=cfg.batch_size, config=cfg, must_match={"width": cfg.width},
                seed=cfg.seed, ema_decay=0.9, save_every=cfg.save_every, log_every=1)


def sample(args):
    path = find_checkpoint(SCRIPT, args.run, args.ckpt)
    ckpt = load_checkpoint(path, SCRIPT)
    cfg = config_from_checkpoint(Config, ckpt, path)
    device = pick_device(args.device)
    model = load_state_checked(Toy(cfg.width).to(device), ckpt["ema"]["model"], path)
    torch.manual_seed(args.seed)
    x = torch.randn(args.n, 3, args.frames or cfg.frames, cfg.resolution, cfg.resolution, device=device)
    with torch.no_grad():
        videos = ddim_sample(model, x, Schedule.make("linear", 100), args.steps)
    write_samples(args.out or path.parent / "samples" / "sample", to_uint8(videos))


def cli(argv=None):
    parser, _ = build_parser(SCRIPT, __doc__, Config, PRESETS)
    args = parser.parse_args(argv)
    {"train": train, "sample": sample}[args.command](args)


if __name__ == "__main__":
    main(cli)
