"""Preprocessing job: EPIC-KITCHENS-100 (real or SynthKitchens) -> index and sample Parquet shards.

    python pipelines/preprocess.py --epic-root DIR --annotations DIR --out OUT \
        [--splits train,validation] [--stage index|samples|all] [--questions DIR] [--labels DIR]
    python pipelines/preprocess.py --stage features --out OUT --model-config configs/tiny.yaml \
        [--set model.vision.init_seed=1 ...] [--feature-dtype auto|float16|float32]

``--stage all`` runs index + samples; ``features`` (the frozen vision tower's pooled features of
every sample shard, OUT/features/<key>/) runs on its own, after samples.

Runs on a local Ray started on demand, or unchanged on a cluster:
``ray job submit --working-dir . -- python pipelines/preprocess.py ...``. Paths may be local or
URIs (s3://...). Bad input is quarantined (OUT/quarantine) and counted (OUT/manifest.json); the
exit code is 0 unless the configuration itself is wrong (2). A split that a stage writes nothing for
ends the run with a one-line warning naming the cause and the flag that fixes it; ``--strict``
makes that exit code 1. Re-runs skip completed shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

from pipelines.common import DEFAULT_OBJECT_STORE_BYTES, add_ray_flags, init_ray, setup_logging
from preprocessing import layout, storage
from preprocessing.epic import SPLIT_FILES
from preprocessing.features import DEFAULT_FEATURE_DTYPE, FEATURE_DTYPES, feature_key, run_features_stage
from preprocessing.index import IndexConfig
from preprocessing.samples import MediaConfig
from preprocessing.stages import DEFAULT_SHARD_SIZE, empty_output_warnings, run_index_stage, run_samples_stage
from preprocessing.window import FPS_CONVENTIONS

STAGES = ("index", "samples", "all", "features")
INDEX_INPUTS = ("annotations", "questions", "labels")
SAMPLES_INPUTS = ("epic_root",)
# the input flags each stage reads: only those must name existing paths (the others are ignored)
STAGE_INPUTS = {"index": INDEX_INPUTS, "samples": SAMPLES_INPUTS, "all": INDEX_INPUTS + SAMPLES_INPUTS,
                "features": ()}
EXIT_EMPTY_OUTPUT = 1  # --strict: a stage wrote nothing for a split


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epic-root",
                   help="EPIC-KITCHENS root holding PXX/videos/*.MP4 and/or PXX/rgb_frames/<vid>/")
    p.add_argument("--annotations",
                   help="directory with EPIC_100_{train,validation}.csv and EPIC_100_video_info.csv")
    p.add_argument("--out", required=True, help="output root (local path or URI)")
    p.add_argument("--splits", default="train,validation", help="comma-separated subset of " + ",".join(SPLIT_FILES))
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="all = index + samples; features (needs --model-config) runs after samples")
    p.add_argument("--questions",
                   help="directory with ek100_questions.json, ek100_questions_val.json, rephrase_ek100.json")
    p.add_argument("--labels", help="hoi-forecast data/ek100 directory (video_info.json, labels/label_<uid>.pkl "
                                    "or labels/ek100_<split>_labels.npy)")
    p.add_argument("--csv", action="append", default=[], metavar="SPLIT=FILE",
                   help="use FILE as the narration CSV of SPLIT (repeatable)")
    p.add_argument("--fps-convention", choices=FPS_CONVENTIONS, default="hoi60",
                   help="hoi60 reproduces hoi-forecast/HandsOnVLM frame indices (needed to use their labels "
                        "and questions); native uses 50 fps for extension videos")
    p.add_argument("--frame-height", type=int, default=MediaConfig.frame_height,
                   help="stored frame height (EPIC rgb_frames are 256); 0 keeps the decoded resolution")
    p.add_argument("--jpeg-quality", type=int, default=MediaConfig.jpeg_quality)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="max actions per sample shard")
    p.add_argument("--unlabelled", choices=("skip", "keep"), default="skip",
                   help="keep writes actions without a trajectory label too (future_valid all false)")
    g = p.add_argument_group("features stage")
    g.add_argument("--model-config", help="model preset name or YAML path (e.g. configs/tiny.yaml); its vision "
                                          "part selects the tower and the cache key")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the preset file, e.g. model.vision.init_seed=1 (repeatable)")
    g.add_argument("--feature-dtype", choices=FEATURE_DTYPES, default=DEFAULT_FEATURE_DTYPE,
                   help="storage dtype of the cached features (computed in the tower's dtype; auto: the dtype "
                        "that holds them exactly, float32 for a bfloat16 tower)")
    g.add_argument("--feature-actors", type=int, default=2, help="vision-tower actors (each builds the tower once)")
    g.add_argument("--feature-gpus", type=float, default=0.0, help="GPUs per actor (0: CPU)")
    g.add_argument("--feature-rows-per-call", type=int, default=1,
                   help="clips per tower call; 1 makes features bit-identical to the model's per-clip "
                        "frame_features, more is faster on GPUs")
    add_ray_flags(p)
    p.add_argument("--object-store-memory", type=int, default=DEFAULT_OBJECT_STORE_BYTES,
                   help="bytes of the local Ray's object store")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--strict", action="store_true",
                   help=f"exit with {EXIT_EMPTY_OUTPUT} when a stage writes nothing for a split (default: a warning)")
    args = p.parse_args(argv)
    args.splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    unknown = [s for s in args.splits if s not in SPLIT_FILES]
    if unknown:
        p.error(f"unknown split(s) {unknown}; choose from {list(SPLIT_FILES)}")
    overrides = {}
    for item in args.csv:
        split, _, path = item.partition("=")
        if split not in SPLIT_FILES or not path:
            p.error(f"--csv expects SPLIT=FILE with SPLIT in {list(SPLIT_FILES)}, got {item!r}")
        overrides[split] = path
    args.csv = overrides
    if args.stage in ("index", "all") and not args.annotations:
        p.error("--annotations is required for the index stage")
    if args.stage in ("samples", "all") and not args.epic_root:
        p.error("--epic-root is required for the samples stage")
    args.model_cfg = None
    if args.stage == "features":
        if not args.model_config:
            p.error("--model-config is required for the features stage")
        if args.feature_actors < 1 or args.feature_rows_per_call < 1 or args.feature_gpus < 0:
            p.error("--feature-actors and --feature-rows-per-call must be >= 1, --feature-gpus >= 0")
        import yaml

        from handsonvlm.config import load_model_config

        try:
            args.model_cfg = load_model_config(args.model_config, args.overrides)
        except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
            p.error(f"--model-config {args.model_config} {args.overrides or ''}: {exc}")
    elif args.overrides:
        p.error("--set applies to --model-config, which only the features stage uses")
    for name in STAGE_INPUTS[args.stage]:
        value = getattr(args, name)
        if value and not storage.exists(value):
            p.error(f"--{name.replace('_', '-')} {value} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    report = {}
    if args.stage in ("index", "all"):
        cfg = IndexConfig(annotations=args.annotations, splits=args.splits, questions=args.questions,
                          labels=args.labels, fps_convention=args.fps_convention, csv_overrides=args.csv)
        report["index"] = run_index_stage(cfg, args.out)
    if args.stage in ("samples", "all"):
        init_ray(args.ray_address, args.num_cpus, args.object_store_memory)
        media = MediaConfig(epic_root=args.epic_root, out=args.out, frame_height=args.frame_height,
                            jpeg_quality=args.jpeg_quality)
        report["samples"] = run_samples_stage(args.out, args.splits, media, args.shard_size, args.unlabelled,
                                              progress=not args.no_progress)
    if args.stage == "features":
        init_ray(args.ray_address, args.num_cpus, args.object_store_memory)
        report["features"] = run_features_stage(args.out, args.splits, args.model_cfg, args.feature_dtype,
                                                args.feature_actors, args.feature_gpus, args.feature_rows_per_call,
                                                progress=not args.no_progress)
        print(f"features: {layout.feature_root(args.out, feature_key(args.model_cfg))}")
    for stage, counts in report.items():  # one line per stage and split: the whole document is the manifest
        for split, split_counts in (counts.items() if isinstance(counts, dict) else [("", counts)]):
            print(f"{stage} {split}: {json.dumps(split_counts, sort_keys=True)}")
    print(f"manifest: {layout.manifest_path(args.out)}")
    problems = empty_output_warnings(report, args.out)
    for line in problems:
        print(f"preprocess.py: {'error' if args.strict else 'warning'}: {line}", file=sys.stderr, flush=True)
    return EXIT_EMPTY_OUTPUT if problems and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
