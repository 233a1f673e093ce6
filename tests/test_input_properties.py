"""Generated bad input through the index stage (and a samples shard), plain Python, no Ray.

Every example starts from a small SynthKitchens tree and breaks its annotation CSVs, question
JSON files and label pickles the way real downloads break (empty files, header-only files,
missing columns, wrong types, unicode, huge values, bad timestamps, invalid UTF-8, code in a
pickle). The properties: the stage never raises, and every input row ends up either in the index
or in the quarantine with a reason (or counted as skipped), never lost. Hypothesis runs
derandomized, so every run tries the same examples.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preprocessing import epic, layout
from preprocessing.index import IndexConfig, build_index
from preprocessing.quarantine import REASONS
from preprocessing.questions import PARAPHRASE_FILE, QUESTION_FILES, parse_question_string
from preprocessing.samples import MediaConfig, process_shard, table_to_ipc
from preprocessing.stages import plan_shards, run_index_stage
from synthkitchens.generate import generate, tree_paths

SPLITS = ("train", "validation")
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SAMPLES_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                            suppress_health_check=[HealthCheck.too_slow])
INVALID_UTF8 = b"\xff\xfe"
INVALID_UTF8_TOKEN = "INVALID-UTF8-TOKEN"  # a field value replaced by INVALID_UTF8 once the row is encoded
MAX_EXTRA_ROWS = 4  # repeated or junk rows appended to a CSV
SHORT_ROW_ODDS = 9  # about one mutated row in ten loses its last fields


class CodeInPickle:
    """Unpickling this would run a shell command: the label store must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo input-properties-pwned",))


# ---------------------------------------------------------------------------------------------
# strategies

NASTY_VALUES = st.sampled_from([
    "", " ", "nan", "NaN", "inf", "-inf", "-1", "0", "3.5", "1e400", "9" * 40, "-" + "9" * 40, "2147483648",
    "70000", "00:61:00.00", "00:00:61.00", "12:xx", "-0:00:01.00", "99999999:00:00.00", "0:0:0", "1:2:3:4",
    "['x'", "[1, True]", "[70000]", "[-1]", "['a', 'b']", "[]", "()", "__import__('os')", "P01", "P01_01",
    "öffne den Kühlschrank ☃", "日本語", "\u202e", '"', "a,b", "line\nbreak", INVALID_UTF8_TOKEN,
])
FIELD_VALUES = st.one_of(NASTY_VALUES, st.text(max_size=12), st.integers(-10**30, 10**30).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated_rows(draw, header: list[str], base_rows: list[list[str]]) -> list[list[str]]:
    """The base rows in their order (hoi uids count rows) with fields replaced in about half of them,
    cut short or extended by repeated and junk rows, some rows missing their last fields."""
    def mutate(row: list[str]) -> list[str]:
        row = list(row)
        for column in draw(st.lists(st.integers(0, len(header) - 1), max_size=3)):
            row[column] = draw(FIELD_VALUES)
        if draw(st.integers(0, SHORT_ROW_ODDS)) == 0:
            row = row[:draw(st.integers(1, len(header) - 1))]
        return row

    rows = [mutate(row) if draw(st.booleans()) else list(row) for row in base_rows]
    rows = rows[:draw(st.integers(0, len(rows)))] if draw(st.booleans()) else rows
    return rows + [mutate(draw(st.sampled_from(base_rows))) for _ in range(draw(st.integers(0, MAX_EXTRA_ROWS)))]


@st.composite
def csv_file(draw, header: list[str], base_rows: list[list[str]]) -> tuple[str, bytes, int | None]:
    """(kind, file bytes, data rows or None when the file as a whole is unusable)."""
    kind = draw(st.sampled_from(["rows", "rows", "rows", "empty", "header_only", "missing_columns", "not_csv"]))
    if kind == "empty":
        return kind, b"", None
    if kind == "not_csv":
        return kind, draw(st.binary(max_size=60)), None
    if kind == "missing_columns":
        dropped = set(draw(st.lists(st.sampled_from(epic.REQUIRED_COLUMNS), min_size=1, max_size=3)))
        keep = [i for i, name in enumerate(header) if name not in dropped]
        rows = [[row[i] for i in keep if i < len(row)] for row in base_rows]
        return kind, encode_csv([header[i] for i in keep], rows), None
    rows = [] if kind == "header_only" else draw(mutated_rows(header, base_rows))
    return kind, encode_csv(header, rows), len(rows)


def encode_csv(header: list[str], rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    return text.getvalue().encode("utf-8").replace(INVALID_UTF8_TOKEN.encode(), INVALID_UTF8)


@st.composite
def question_file(draw, base: dict) -> bytes | None:
    """None keeps the file; else bytes that are no JSON, JSON that is no object, or an object whose
    values are anything JSON holds (some real questions among them)."""
    kind = draw(st.sampled_from(["keep", "not_json", "any_json", "object"]))
    if kind == "keep":
        return None
    if kind == "not_json":
        return draw(st.binary(max_size=40))
    if kind == "any_json":
        return json.dumps(draw(JSON_VALUES)).encode()
    keys = st.sampled_from(sorted(base)) | st.text(max_size=20)
    values = st.sampled_from(sorted(base.values())) | JSON_VALUES
    return json.dumps(draw(st.dictionaries(keys, values, max_size=6))).encode()


def broken_label(label: dict, field: str, value) -> dict:
    """``label`` with one field (dotted: ``hand_trajs.RIGHT.traj``) replaced by ``value``."""
    label = pickle.loads(pickle.dumps(label))
    *parents, last = field.split(".")
    target = label
    for part in parents:
        target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            return label
    target[last] = value
    return label


LABEL_FIELDS = ["frame_indices", "hand_trajs", "hand_trajs.RIGHT", "hand_trajs.RIGHT.traj", "hand_trajs.LEFT.traj",
                "affordance", "affordance.select_points_homo", "past_hand_centers", "past_hand_centers.RIGHT"]
LABEL_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from([np.full((21, 2), np.nan, np.float32), np.full((21, 2), np.inf, np.float32),
                     np.full((21, 2), 1e30, np.float64), np.zeros((20, 2), np.float32), np.zeros((21, 3)),
                     np.array(["a"] * 42).reshape(21, 2), np.zeros((0,)), np.zeros((10, 2), np.float32)]))


@st.composite
def label_payload(draw, base_label: dict) -> bytes:
    """A label pickle broken in one way: not a pickle, code, plain data, or a label with a bad field."""
    kind = draw(st.sampled_from(["not_pickle", "code", "plain_data", "bad_field", "bad_field"]))
    if kind == "not_pickle":
        return draw(st.binary(max_size=40))
    if kind == "code":
        return pickle.dumps(CodeInPickle())
    if kind == "plain_data":
        return pickle.dumps(draw(JSON_VALUES))
    return pickle.dumps(broken_label(base_label, draw(st.sampled_from(LABEL_FIELDS)), draw(LABEL_VALUES)))


# ---------------------------------------------------------------------------------------------
# the base tree

@pytest.fixture(scope="module")
def base_tree(tmp_path_factory) -> Path:
    """SynthKitchens, 3 videos x 4 actions; the first video also as rgb_frames (for the samples property)."""
    tree = tmp_path_factory.mktemp("base_tree")
    generate(str(tree), videos=3, actions_per_video=4, seed=0, rgb_frames=1, workers=1)
    return tree


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def index_config(tree: Path) -> IndexConfig:
    paths = tree_paths(tree)
    return IndexConfig(annotations=str(paths["annotations"]), splits=SPLITS, questions=str(paths["questions"]),
                       labels=str(paths["labels"]))


def copy_sources(base: Path, into: Path) -> Path:
    """The tree's annotations, questions and labels (not its media) under ``into``."""
    base_paths, paths = tree_paths(base), tree_paths(into)
    for part in ("annotations", "questions", "labels"):
        shutil.copytree(base_paths[part], paths[part])
    return into


# ---------------------------------------------------------------------------------------------
# properties

def assert_no_row_lost(result, cfg: IndexConfig, split: str, data_rows: int | None) -> None:
    """The split's rows are all accounted for: written, skipped or quarantined, each at most once."""
    table, stats = result.tables[split], result.stats[split]
    csv_uri = cfg.csv_uri(split)
    rejected_file = [r for r in result.quarantine.rows if r.reason == "bad_csv" and r.source == csv_uri]
    if data_rows is None:  # the file as a whole is unusable: one quarantine row says so, nothing is indexed
        assert rejected_file and table.num_rows == 0
        return
    assert not rejected_file
    assert stats["read"] == data_rows
    quarantined = sum(stats["quarantined"].values())
    assert stats["written"] + sum(stats["skipped"].values()) + quarantined == data_rows, stats
    split_rows = table.column("split_row").to_pylist()
    assert len(set(split_rows)) == len(split_rows) and all(0 <= r < data_rows for r in split_rows)
    ids = table.column("narration_id").to_pylist()
    assert len(set(ids)) == len(ids)


def assert_every_question_entry_used_or_quarantined(result, path: Path, payload: bytes) -> None:
    from_file = [r for r in result.quarantine.rows if r.source == str(path)]
    assert all(r.reason == "malformed_question" and r.detail for r in from_file)
    try:
        entries = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        assert len(from_file) == 1  # the whole file, as one row
        return
    if not isinstance(entries, dict):
        assert len(from_file) == 1
        return
    usable = [key for key, value in entries.items() if isinstance(value, str) and parse_question_string(value)]
    assert len(usable) + len(from_file) == len(entries)


@pytest.fixture(scope="module")
def base_inputs(base_tree):
    paths = tree_paths(base_tree)
    csvs = {split: read_csv_rows(paths["annotations"] / epic.SPLIT_FILES[split]) for split in SPLITS}
    questions = {split: json.loads((paths["questions"] / name).read_text()) for split, name in QUESTION_FILES.items()}
    label_files = sorted((paths["labels"] / "labels").glob("label_*.pkl"))
    base_label = pickle.loads(label_files[0].read_bytes())
    return {"csvs": csvs, "questions": questions, "label_files": [p.name for p in label_files],
            "base_label": base_label}


@st.composite
def broken_sources(draw, base_inputs) -> dict:
    """What one example breaks: per split a CSV, per question file a replacement, some label pickles."""
    csvs = {split: draw(csv_file(*base_inputs["csvs"][split])) for split in SPLITS}
    questions = {split: draw(question_file(base_inputs["questions"][split])) for split in QUESTION_FILES}
    paraphrases = draw(question_file({"open bottle": ["uncap the bottle"]}))
    names = draw(st.lists(st.sampled_from(base_inputs["label_files"]), max_size=4, unique=True))
    labels = {name: draw(label_payload(base_inputs["base_label"])) for name in names}
    labelled_uids = draw(st.sampled_from([None, None, None, b"", b"[1, 2", b'{"a": 1}', b'["x", 3]', b"[1e400]"]))
    return {"csvs": csvs, "questions": questions, "paraphrases": paraphrases, "labels": labels,
            "labelled_uids": labelled_uids}


def write_broken_tree(tree: Path, broken: dict) -> None:
    paths = tree_paths(tree)
    for split, (_, payload, _) in broken["csvs"].items():
        (paths["annotations"] / epic.SPLIT_FILES[split]).write_bytes(payload)
    for split, payload in broken["questions"].items():
        if payload is not None:
            (paths["questions"] / QUESTION_FILES[split]).write_bytes(payload)
    if broken["paraphrases"] is not None:
        (paths["questions"] / PARAPHRASE_FILE).write_bytes(broken["paraphrases"])
    for name, payload in broken["labels"].items():
        (paths["labels"] / "labels" / name).write_bytes(payload)
    if broken["labelled_uids"] is not None:
        (paths["labels"] / "video_info.json").write_bytes(broken["labelled_uids"])


def test_bad_inputs_never_crash_the_index_and_no_row_is_lost(base_tree, base_inputs):
    @PROPERTY_SETTINGS
    @given(broken=broken_sources(base_inputs))
    def check(broken):
        with tempfile.TemporaryDirectory() as scratch:
            tree = copy_sources(base_tree, Path(scratch) / "tree")
            write_broken_tree(tree, broken)
            cfg = index_config(tree)
            result = build_index(cfg)
            for split, (_, _, data_rows) in broken["csvs"].items():
                assert_no_row_lost(result, cfg, split, data_rows)
            for split, payload in broken["questions"].items():
                if payload is not None:
                    assert_every_question_entry_used_or_quarantined(
                        result, tree_paths(tree)["questions"] / QUESTION_FILES[split], payload)
            assert all(r.reason in REASONS and r.detail for r in result.quarantine.rows)

    check()


def test_header_only_train_csv_next_to_a_normal_validation_csv(base_tree, tmp_path):
    """The reported crash: an EPIC_100_train.csv with a header and no rows killed the index stage
    (``DataFrame.apply(axis=1)`` on an empty frame returns a frame)."""
    tree = copy_sources(base_tree, tmp_path / "tree")
    train_csv = tree_paths(tree)["annotations"] / epic.SPLIT_FILES["train"]
    train_csv.write_text(train_csv.read_text().splitlines()[0] + "\n")
    out = tmp_path / "out"
    # without labels: they are keyed by row numbers counted over train + validation, which an empty
    # train CSV shifts (the validation actions would be quarantined as label_window_mismatch)
    stats = run_index_stage(IndexConfig(annotations=str(tree_paths(tree)["annotations"]), splits=SPLITS), str(out))
    assert stats["train"]["read"] == stats["train"]["written"] == 0
    assert stats["validation"]["read"] == stats["validation"]["written"] > 0
    assert Path(layout.index_path(str(out), "train")).exists()


# ---------------------------------------------------------------------------------------------
# the samples stage's unit of work on broken media

@pytest.fixture(scope="module")
def indexed_shards(base_tree, tmp_path_factory):
    """The base tree's index as the samples stage plans it: one shard per video."""
    result = build_index(index_config(base_tree))
    return [(split, shard_id, rows) for split in SPLITS for shard_id, rows in plan_shards(result.tables[split], 4)]


MEDIA_DAMAGE = ("truncate", "garbage", "empty", "remove", "remove_frames", "corrupt_frames")


@SAMPLES_SETTINGS
@given(damage=st.sampled_from(MEDIA_DAMAGE), fraction=st.floats(0.0, 1.0), picks=st.randoms(use_true_random=False))
def test_broken_media_never_crash_a_shard_and_no_row_is_lost(base_tree, indexed_shards, damage, fraction, picks):
    with tempfile.TemporaryDirectory() as scratch:
        epic_root = Path(scratch) / "EPIC-KITCHENS"
        shutil.copytree(tree_paths(base_tree)["epic_root"], epic_root)
        damage_media(epic_root, damage, fraction, picks)
        media = MediaConfig(epic_root=str(epic_root), out=str(Path(scratch) / "out"))
        for split, shard_id, rows in indexed_shards:
            summary = process_shard(split, shard_id, table_to_ipc(rows), "fingerprint", media)
            assert summary["rows"] == rows.num_rows
            assert summary["written"] + sum(summary["quarantined"].values()) == rows.num_rows, summary
            assert set(summary["quarantined"]) <= set(REASONS)


def damage_media(epic_root: Path, damage: str, fraction: float, picks) -> None:
    """Break the MP4s (``truncate`` to ``fraction`` of their bytes, ``garbage``, ``empty``, ``remove``)
    or a ``fraction`` of the rgb_frames JPEGs (``remove_frames``, ``corrupt_frames``)."""
    if damage in ("remove_frames", "corrupt_frames"):
        frames = sorted(epic_root.glob("P*/rgb_frames/*/*.jpg"))
        for frame in picks.sample(frames, round(fraction * len(frames))):
            if damage == "remove_frames":
                frame.unlink()
            else:
                frame.write_bytes(frame.read_bytes()[: len(frame.read_bytes()) // 2] + b"\x00" * 16)
        return
    for video in sorted(epic_root.glob("P*/videos/*.MP4")):
        data = video.read_bytes()
        if damage == "truncate":
            video.write_bytes(data[: int(fraction * len(data))])
        elif damage == "garbage":
            video.write_bytes(bytes(picks.getrandbits(8) for _ in range(len(data) // 64)))
        elif damage == "empty":
            video.write_bytes(b"")
        else:
            video.unlink()


# ---------------------------------------------------------------------------------------------
# forgiving command lines

def test_data_root_accepts_the_output_root_or_its_samples_folder(tmp_path):
    out = tmp_path / "data"
    (out / layout.SAMPLES_DIR / "train").mkdir(parents=True)
    for form in (out, f"{out}/", out / layout.SAMPLES_DIR, f"{out / layout.SAMPLES_DIR}/"):
        assert layout.data_root(str(form)) == str(out)
    nested = tmp_path / layout.SAMPLES_DIR  # a root that happens to be called "samples"
    (nested / layout.SAMPLES_DIR).mkdir(parents=True)
    assert layout.data_root(str(nested)) == str(nested)


def test_the_index_stage_ignores_a_missing_epic_root(base_tree, tmp_path):
    from pipelines import preprocess

    paths = tree_paths(base_tree)
    out = tmp_path / "out"
    assert preprocess.main(["--stage", "index", "--annotations", str(paths["annotations"]),
                            "--epic-root", str(tmp_path / "absent"), "--out", str(out)]) == 0
    assert Path(layout.index_path(str(out), "train")).exists()


def test_synthkitchens_prints_the_preprocess_command_for_its_tree(tmp_path):
    tree = tmp_path / "synth"
    generated = subprocess.run([sys.executable, "-m", "synthkitchens", "--out", str(tree), "--videos", "3",
                                "--actions-per-video", "2", "--workers", "1", "--no-videos"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    command = shlex.split(generated.stdout.splitlines()[-1].removeprefix("next: "))
    assert command[:2] == ["python", "pipelines/preprocess.py"]
    done = subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(layout.index_path(f"{tree}-data", "validation")).exists()
