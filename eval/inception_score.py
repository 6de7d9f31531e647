"""Inception Score of generated videos with the C3D fine-tuned on UCF-101, as one JSON line.

    python -m eval.inception_score --fake runs/vqvdm-ucf101-ucf128/samples/sample/samples.npz --c3d c3d.npz

StyleGAN-V's isv2048_ucf protocol (src/metrics/video_inception_score.py): 2048 videos of 16 frames, class
probabilities from C3D, shuffled with RandomState(42) into 10 splits; prints the mean and std over the splits.
The weights are TGANv2's conv3d_deepnetA_ucf.npz with mean2.npz beside it, or a PyTorch file with the same layer names.
"""
import argparse

from common.c3d import load_c3d
from common.cli import Parser, add_output_flags, main, number
from common.errors import UserError
from common.evaluate import c3d_probs, report
from common.metrics import inception_score
from common.files import output_file
from common.run import pick_device
from common.sources import npz_resolution, parse_source, video_batches


def parser():
    p = Parser(prog="python -m eval.inception_score", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake", required=True, help="videos to score: samples.npz, a folder, or name[:root]")
    p.add_argument("--c3d", required=True, help="C3D UCF-101 weights (.npz from TGANv2 or a PyTorch file)")
    p.add_argument("--c3d-mean", default=None, help="the mean clip (default: mean2.npz beside --c3d)")
    p.add_argument("--n", type=number(int, lo=1), default=2048, help="videos scored (default: 2048)")
    p.add_argument("--splits", type=number(int, lo=1), default=10, help="splits for mean and std (default: 10)")
    p.add_argument("--resolution", type=number(int, lo=1), default=None,
                   help="resolution folder videos are loaded at (default: the npz's, else 128)")
    add_output_flags(p)
    return p


def run(argv=None):
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    parse_source(args.fake)                                # a bad spec or npz fails before anything is loaded
    if args.out:
        output_file(args.out)
    c3d = load_c3d(args.c3d, args.c3d_mean, device)        # missing weights fail before any decoding
    resolution = args.resolution or npz_resolution(args.fake) or 128
    count, batches = video_batches(args.fake, args.n, 16, resolution, real=False, batch_size=args.batch_size)
    if count < args.splits:
        raise UserError(f"--splits {args.splits} needs at least as many videos, and {args.fake} gives {count}")
    mean, std = inception_score(c3d_probs(batches, c3d, device), splits=args.splits)
    report({"fake": args.fake, "n": count, "is": mean, "is_std": std, "splits": args.splits}, args.out)


if __name__ == "__main__":
    main(run)
