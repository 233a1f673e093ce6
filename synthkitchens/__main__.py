"""Command line of the SynthKitchens generator: writes a tree and prints its counts and language gap.

Usage::

    python -m synthkitchens --out DIR [--videos 24] [--seed 0] [--actions-per-video 12]
        [--fps 30.0] [--rgb-frames 0] [--workers 2] [--no-videos] [--rbhp-coverage F]
        [--layout fitted|random]

``--layout random`` puts 3-4 larger objects anywhere on the counter (only the frames say where the
named object is); ``fitted`` (default) keeps each class near its fixed spot (:mod:`synthkitchens.scene`).

``--rbhp-coverage F`` gives RBHP (reasoning) questions to exactly round(F * N) of each split's N
actions, seeded by ``--seed`` (the real EPIC-100 question files cover about 0.19); without it
each action keeps its scene's own draw, about 90 % of them with questions
(:mod:`synthkitchens.generate`, "RBHP coverage").

It ends with the ``pipelines/preprocess.py`` command that preprocesses the tree into ``DIR-data``.
"""

from __future__ import annotations

import argparse
import shlex

import synthkitchens
from synthkitchens.gap_report import language_gap_report
from synthkitchens.generate import GENERATOR_VERSION, SPLITS, generate, preprocess_source_args
from synthkitchens.scene import DEFAULT_LAYOUT, LAYOUTS

PREPROCESSED_SUFFIX = "-data"  # the suggested preprocessing output: a sibling of the tree, never inside it


def preprocess_command(out_dir: str, with_videos: bool = True) -> str:
    """The shell command that preprocesses the tree in ``out_dir`` into ``out_dir-data``: index and
    samples, or the index only for a tree without videos."""
    out = str(out_dir).rstrip("/")
    stage = [] if with_videos else ["--stage", "index"]
    return shlex.join(["python", "pipelines/preprocess.py", *preprocess_source_args(out),
                       "--out", out + PREPROCESSED_SUFFIX, *stage])


def main(argv=None) -> dict:
    """Generate the tree the arguments ask for, print a summary and return ``generate``'s."""
    description = synthkitchens.__doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m synthkitchens", description=description)
    parser.add_argument("--out", required=True, help="output root directory")
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--actions-per-video", type=int, default=12)
    parser.add_argument("--fps", type=float, default=30.0, help="native MP4 frame rate")
    parser.add_argument("--rgb-frames", type=int, default=0, metavar="K",
                        help="also extract 60-fps rgb_frames JPEGs for the first K videos")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-videos", action="store_true", help="annotations, questions and labels only")
    parser.add_argument("--rbhp-coverage", type=float, default=None, metavar="F",
                        help="fraction of each split's actions that get RBHP questions, in [0, 1] (real EPIC: "
                             "about 0.19); default: each action's own draw, about 0.9")
    parser.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                        help="where the objects lie: fitted = near fixed per-class spots, random = anywhere")
    args = parser.parse_args(argv)
    if args.rbhp_coverage is not None and not 0.0 <= args.rbhp_coverage <= 1.0:
        parser.error(f"--rbhp-coverage must lie in [0, 1], got {args.rbhp_coverage}")
    summary = generate(args.out, videos=args.videos, seed=args.seed, actions_per_video=args.actions_per_video,
                       fps=args.fps, rgb_frames=args.rgb_frames, workers=args.workers,
                       write_videos=not args.no_videos, rbhp_coverage=args.rbhp_coverage, layout=args.layout)
    print(f"SynthKitchens {GENERATOR_VERSION} ({args.layout} layout) -> {summary['out_dir']} ({summary['seconds']} s)")
    for split in SPLITS:
        actions, with_questions = summary["actions"][split], summary["question_clips"][split]
        share = f" ({with_questions / actions:.0%})" if actions else ""
        print(f"  {split:<10} videos {summary['videos'][split]:>3}  actions {actions:>4}"
              f"  clips with questions {with_questions:>4}{share}")
    if summary["rgb_frame_videos"]:
        print(f"  rgb_frames for {', '.join(summary['rgb_frame_videos'])}")
    if summary["actions"]["validation"]:
        gap = language_gap_report(args.out)
        line = (f"  validation ADE: constant velocity {gap['ade_constant_velocity']:.4f}, "
                f"text-free oracle {gap['ade_text_free_oracle']:.4f}, random object {gap['ade_random_object']:.4f}, "
                f"text oracle {gap['ade_text_oracle']:.4f}")
        if "ade_question_only" in gap:  # the fitted layout
            line += f", question only {gap['ade_question_only']:.4f} (shuffled {gap['ade_shuffled_question']:.4f})"
        print(line)
    print(f"next: {preprocess_command(args.out, with_videos=not args.no_videos)}")
    return summary


if __name__ == "__main__":
    main()
