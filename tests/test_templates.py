"""Tests for handsonvlm.templates (TemplateSet, the release parser, the JSON file, templates_for)
and the ``python -m handsonvlm.compat templates`` command.

The release's sentences are not in this repository: every parser test writes a synthetic
``constants.py`` / ``epic_dataset.py`` with the release's Python structure and invented wordings.
``test_real_release_clone`` reads an actual clone named by HANDSONVLM_RELEASE_REPO and checks only
counts and placeholders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from handsonvlm import compat, data, prompts
from handsonvlm.config import DataConfig, ModelConfig
from handsonvlm.templates import (
    PROJECT_TEMPLATES,
    RELEASE_CONSTANTS_FILE,
    RELEASE_DATASET_FILE,
    TEMPLATE_LISTS,
    TEMPLATES_FORMAT,
    TemplateError,
    TemplateSet,
    TemplatesFileMissing,
    differing_lists,
    name_positional_fields,
    parse_release_sources,
    placeholder_names,
    read_templates,
    release_templates,
    save_templates,
    templates_for,
)

RELEASE_REPO_ENV = "HANDSONVLM_RELEASE_REPO"
# The release's list sizes: general, action, follow-up, action-prediction questions; action and
# trajectory answers; the inline action-prediction answers.
RELEASE_COUNTS = {"general_questions": 4, "action_questions": 3, "follow_up_questions": 4,
                  "action_prediction_questions": 3, "action_answers": 2, "trajectory_answers": 2,
                  "action_prediction_answers": 3}

# Invented wordings in the release's layout. The module-level raise proves the parser never runs it.
SYNTHETIC_CONSTANTS = '''\
import json
import os

LOGDIR = "."
HAND_TOKEN_TEMPLATE = "<hand_traj>"
raise SystemExit("the template parser must not execute constants.py")

general_question_templates = [
    "Which way are the palms drifting?",
    "Where do the fingers head from here?",
    "Sketch the coming path of both palms.",
    "What will the wrists do in a moment?"
]

action_question_templates = [
    "How do I go about {}?",
    "Show the palm route for {}.",
    "Guide my fingers to {}.",
]

general_specific_question_templates = [
    "And the palm route for that?",
    "How would the wrists travel then?",
    "Plot the fingers for it.",
    "Which path gets that done?"
]

action_prediction_templates = ["What comes next here?",
                               "Guess the upcoming step.",
                               "Name the next chore."]

action_answer_templates = [
    "Sure, for {} the palms go: {}.",
    "To {}, steer the fingers {}.",
]

general_trajectory_answer_templates = [
    "Palms go: {}.",
    "Fingers travel {}.",
]

general_answer_templates = [
    "Unused {}.",
]

not_a_template_list = ["fine", 3]
'''

SYNTHETIC_DATASET = '''\
import random

from handsonvlm.constants import action_question_templates


class EpicConversationDataset:
    def get_sources(self, i):
        hoi_feature_dict, action = self.epic_hoi_dataset.__getitem__(i)
        narration = hoi_feature_dict["narration"]
        action_prediction_answer_templates = []
        action_prediction_answer_templates.append("I expect {} next.".format(narration))
        action_prediction_answer_templates.append("Next comes {}.".format(narration))
        action_prediction_answer_templates.append("Next comes {}, given the {} in view.".format(narration, action.noun))
        return random.choice(action_question_templates).format(narration)
'''

EXPECTED = {
    "general_questions": ("Which way are the palms drifting?", "Where do the fingers head from here?",
                          "Sketch the coming path of both palms.", "What will the wrists do in a moment?"),
    "action_questions": ("How do I go about {narration}?", "Show the palm route for {narration}.",
                         "Guide my fingers to {narration}."),
    "follow_up_questions": ("And the palm route for that?", "How would the wrists travel then?",
                            "Plot the fingers for it.", "Which path gets that done?"),
    "action_prediction_questions": ("What comes next here?", "Guess the upcoming step.", "Name the next chore."),
    "action_answers": ("Sure, for {narration} the palms go: {hands}.", "To {narration}, steer the fingers {hands}."),
    "trajectory_answers": ("Palms go: {hands}.", "Fingers travel {hands}."),
    "action_prediction_answers": ("I expect {narration} next.", "Next comes {narration}.",
                                  "Next comes {narration}, given the {noun} in view."),
}


def synthetic_set(**changes) -> TemplateSet:
    return TemplateSet(**{**EXPECTED, **changes}, source="synthetic")


def write_release_tree(root: Path, constants: str = SYNTHETIC_CONSTANTS, dataset: str = SYNTHETIC_DATASET) -> Path:
    (root / RELEASE_CONSTANTS_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / RELEASE_DATASET_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / RELEASE_CONSTANTS_FILE).write_text(constants, encoding="utf-8")
    (root / RELEASE_DATASET_FILE).write_text(dataset, encoding="utf-8")
    return root


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def release_git_repo(tmp_path) -> tuple[Path, str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = write_release_tree(tmp_path / "release")
    git(repo, "init", "-q")
    return repo, commit_all(repo, "synthetic release")


# ---- TemplateSet -------------------------------------------------------------------------------------
def test_templateset_stores_tuples_and_picks_noun_answers():
    ts = TemplateSet(**{k: list(v) for k, v in EXPECTED.items()})
    assert ts.lists() == EXPECTED and ts.source == "project"
    assert all(isinstance(v, tuple) for v in ts.lists().values())
    assert ts.action_prediction_answers_for(has_noun=True) == EXPECTED["action_prediction_answers"]
    assert ts.action_prediction_answers_for(has_noun=False) == EXPECTED["action_prediction_answers"][:2]


@pytest.mark.parametrize(("list_name", "template", "message"), [
    ("trajectory_answers", "Palms go somewhere.", "{hands} exactly once, found 0"),
    ("action_answers", "For {narration}: {hands} then {hands}.", "{hands} exactly once, found 2"),
    ("action_questions", "How do I do it?", "{narration} exactly once"),
    ("general_questions", "Where will {narration} go?", "unknown placeholder {narration}"),
    ("trajectory_answers", "At {speed}: {hands}.", "unknown placeholder {speed}"),
    ("action_questions", "How do I go about {}?", "positional placeholder"),
    ("trajectory_answers", "Palms {hands!r}.", "conversion or format spec"),
    ("follow_up_questions", "Which {way?", "not a format string"),
    ("action_prediction_answers", "I expect {narration}, {noun} and {noun}.", "{noun} may occur at most once"),
    ("general_questions", "   ", "non-empty string"),
])
def test_invalid_template_names_list_and_template(list_name, template, message):
    with pytest.raises(TemplateError) as error:
        synthetic_set(**{list_name: (*EXPECTED[list_name], template)})
    assert message in str(error.value)
    assert repr(list_name) in str(error.value) and repr(template) in str(error.value)


def test_invalid_lists():
    with pytest.raises(TemplateError, match="'follow_up_questions' is empty"):
        synthetic_set(follow_up_questions=())
    with pytest.raises(TemplateError, match="sequence of strings"):
        synthetic_set(general_questions="Where?")
    with pytest.raises(TemplateError, match="at least one must do without"):
        synthetic_set(action_prediction_answers=("Next comes {narration} with {noun}.",))


def test_name_positional_fields_keeps_literal_braces():
    named = name_positional_fields("Mark {{this}} with {} then {1}", ("narration", "hands"))
    assert named == "Mark {{this}} with {narration} then {hands}"
    assert named.format(narration="n", hands="h") == "Mark {this} with n then h"
    with pytest.raises(TemplateError, match="positional field 1 has no argument"):
        name_positional_fields("{} and {}", ("narration",))


def test_project_templates_are_the_prompts_wordings():
    ts = PROJECT_TEMPLATES
    assert ts.source == "project"
    assert [q.format(narration="open fridge") for q in ts.action_questions] == [
        q.format("open fridge") for q in prompts.ACTION_QUESTIONS]
    assert ts.action_answers == prompts.ACTION_ANSWERS
    assert ts.general_questions == prompts.GENERAL_QUESTIONS
    assert ts.trajectory_answers == prompts.TRAJECTORY_ANSWERS
    assert ts.action_prediction_questions == prompts.ACTION_PREDICTION_QUESTIONS
    assert ts.action_prediction_answers == prompts.ACTION_PREDICTION_ANSWERS + prompts.ACTION_PREDICTION_NOUN_ANSWERS
    assert ts.action_prediction_answers_for(has_noun=False) == prompts.ACTION_PREDICTION_ANSWERS
    assert ts.follow_up_questions == prompts.FOLLOW_UP_TRAJECTORY_QUESTIONS


def test_differing_lists():
    assert differing_lists(PROJECT_TEMPLATES, PROJECT_TEMPLATES) == ()
    reordered = synthetic_set(trajectory_answers=EXPECTED["trajectory_answers"][::-1])
    assert differing_lists(synthetic_set(), reordered) == ("trajectory_answers",)
    assert differing_lists(synthetic_set(), replace(synthetic_set(), source="other")) == ()
    assert set(differing_lists(synthetic_set(), PROJECT_TEMPLATES)) == set(TEMPLATE_LISTS)


# ---- the release parser ---------------------------------------------------------------------------------
def test_parse_release_sources():
    ts = parse_release_sources(SYNTHETIC_CONSTANTS, SYNTHETIC_DATASET, source="release test")
    assert ts.lists() == EXPECTED
    assert ts.source == "release test"
    assert {name: len(values) for name, values in ts.lists().items()} == RELEASE_COUNTS


@pytest.mark.parametrize(("constants", "dataset", "message"), [
    (SYNTHETIC_CONSTANTS.replace("action_answer_templates =", "renamed_answer_templates ="), SYNTHETIC_DATASET,
     "handsonvlm/constants.py: no module-level list of strings 'action_answer_templates'"),
    (SYNTHETIC_CONSTANTS.replace('    "Palms go: {}.",', "    3,"), SYNTHETIC_DATASET,
     "'general_trajectory_answer_templates'"),
    (SYNTHETIC_CONSTANTS.replace('"To {}, steer the fingers {}."', '"To {}, steer the fingers."'), SYNTHETIC_DATASET,
     "{hands} exactly once, found 0"),
    (SYNTHETIC_CONSTANTS.replace('"Palms go: {}."', '"Palms go: {} {}."'), SYNTHETIC_DATASET,
     "positional field 1 has no argument"),
    (SYNTHETIC_CONSTANTS + "\ndef broken(:\n", SYNTHETIC_DATASET, "constants.py: cannot parse"),
    (SYNTHETIC_CONSTANTS, SYNTHETIC_DATASET.replace("action.noun", "action.verb"),
     "unknown .format argument 'action.verb'"),
    (SYNTHETIC_CONSTANTS, SYNTHETIC_DATASET.replace("action_prediction_answer_templates.append", "print"),
     "no action_prediction_answer_templates.append(...) calls"),
    (SYNTHETIC_CONSTANTS, SYNTHETIC_DATASET.replace('"Next comes {}.".format(narration)', "narration"),
     'expected action_prediction_answer_templates.append("...".format(...))'),
])
def test_parse_release_sources_errors(constants, dataset, message):
    with pytest.raises(TemplateError) as error:
        parse_release_sources(constants, dataset)
    assert message in str(error.value)


def test_release_templates_from_a_git_checkout(release_git_repo):
    repo, commit = release_git_repo
    ts = release_templates(repo)
    assert ts.lists() == EXPECTED
    assert ts.source == f"release {repo.resolve()} @ {commit}"
    # an edit that is not committed is read, and the source says so
    constants = repo / RELEASE_CONSTANTS_FILE
    constants.write_text(constants.read_text().replace("Palms go: {}.", "Palms head {}."), encoding="utf-8")
    edited = release_templates(repo)
    assert edited.trajectory_answers[0] == "Palms head {hands}."
    assert edited.source.endswith(f"@ {commit} + local changes")


def test_release_templates_from_a_bare_git_dir_and_a_revision(release_git_repo, tmp_path):
    repo, first = release_git_repo
    constants = repo / RELEASE_CONSTANTS_FILE
    constants.write_text(constants.read_text().replace("Palms go: {}.", "Palms head {}."), encoding="utf-8")
    second = commit_all(repo, "reword")
    bare = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    at_head = release_templates(bare)
    assert at_head.trajectory_answers[0] == "Palms head {hands}." and at_head.source.endswith(f"@ {second}")
    at_first = release_templates(bare, rev=first[:12])
    assert at_first.lists() == EXPECTED and at_first.source.endswith(f"@ {first}")
    with pytest.raises(FileNotFoundError, match="revision 'no-such-rev'"):
        release_templates(bare, rev="no-such-rev")


def test_release_templates_without_git_and_missing_files(tmp_path):
    plain = write_release_tree(tmp_path / "plain")
    ts = release_templates(plain)
    assert ts.lists() == EXPECTED and ts.source == f"release {plain.resolve()}"
    (plain / RELEASE_DATASET_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="epic_dataset.py"):
        release_templates(plain)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        release_templates(tmp_path / "nowhere")


# ---- the JSON file and templates_for ----------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    for ts in (synthetic_set(), PROJECT_TEMPLATES):
        path = save_templates(ts, tmp_path / "sub" / f"{ts.source}.json")
        document = json.loads(path.read_text(encoding="utf-8"))
        assert document["format"] == TEMPLATES_FORMAT and document["source"] == ts.source
        assert list(document["templates"]) == list(TEMPLATE_LISTS)
        assert read_templates(path) == ts


def test_read_templates_errors(tmp_path):
    path = save_templates(synthetic_set(), tmp_path / "t.json")
    good = json.loads(path.read_text(encoding="utf-8"))

    def write(document) -> Path:
        path.write_text(json.dumps(document), encoding="utf-8")
        return path

    with pytest.raises(TemplateError, match="format 'handsonvlm-templates/0'"):
        read_templates(write({**good, "format": "handsonvlm-templates/0"}))
    lists = dict(good["templates"])
    lists.pop("follow_up_questions")
    with pytest.raises(TemplateError, match=r"missing lists \['follow_up_questions'\]"):
        read_templates(write({**good, "templates": lists}))
    with pytest.raises(TemplateError, match=r"unknown lists \['extra'\]"):
        read_templates(write({**good, "templates": {**good["templates"], "extra": ["x"]}}))
    with pytest.raises(TemplateError, match="unknown placeholder {speed}"):
        read_templates(write({**good, "templates": {**good["templates"], "trajectory_answers": ["{speed} {hands}"]}}))
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TemplateError, match="is not JSON"):
        read_templates(path)
    with pytest.raises(TemplatesFileMissing, match="does not exist"):
        read_templates(tmp_path / "missing.json")


def test_templates_for_both_modes(tmp_path):
    path = save_templates(synthetic_set(), tmp_path / "templates.json")
    corrected, release = ModelConfig(), ModelConfig(mode="release")
    assert templates_for(corrected, DataConfig()) is PROJECT_TEMPLATES
    assert templates_for(corrected, None) is PROJECT_TEMPLATES
    assert templates_for(corrected, DataConfig(templates=str(path))) == synthetic_set()
    assert templates_for(release, DataConfig(templates=str(path))) == synthetic_set()
    with pytest.raises(FileNotFoundError) as error:
        templates_for(release, DataConfig())
    message = str(error.value)
    assert "python -m handsonvlm.compat templates --release-repo PATH --out templates.json" in message
    assert "--set data.templates=templates.json" in message
    with pytest.raises(TemplatesFileMissing, match="missing.json"):
        templates_for(release, DataConfig(templates=str(tmp_path / "missing.json")))


# ---- conversations from a TemplateSet -----------------------------------------------------------------------
def test_turns_read_the_template_set():
    cfg = ModelConfig()
    hands = prompts.hand_tokens(cfg.hand_token, cfg.num_future_points)
    ts = synthetic_set()
    assert data.vhp_turns("cut onion", cfg, question_index=4, answer_index=1, templates=ts) == [
        (f"{cfg.image_token}\nShow the palm route for cut onion.", f"To cut onion, steer the fingers {hands}.")]
    assert data.rbhp_turns("Why?", cfg, answer_index=1, with_answer=False, templates=ts) == [
        (f"{cfg.image_token}\nWhy?", None)]
    assert data.rbhp_turns("Why?", cfg, templates=ts)[0][1] == f"Palms go: {hands}."
    # the defaults are the project's wordings, filled as before
    assert data.vhp_turns("cut onion", cfg, question_index=2)[0][0] == (
        f"{cfg.image_token}\n" + prompts.ACTION_QUESTIONS[2].format("cut onion"))
    assert data.vhp_turns("cut onion", cfg) == data.vhp_turns("cut onion", cfg, templates=PROJECT_TEMPLATES)


# ---- the command line -------------------------------------------------------------------------------------------
def test_cli_templates_end_to_end(release_git_repo, tmp_path, capsys):
    repo, commit = release_git_repo
    out = tmp_path / "templates.json"
    assert compat.main(["templates", "--release-repo", str(repo), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = read_templates(out)
    assert written.lists() == EXPECTED and commit in written.source
    assert commit in printed and str(out) in printed
    for name, count in RELEASE_COUNTS.items():
        assert f"{name:<28} {count:>2}" in printed
    assert "--set data.templates=" in printed

    assert compat.main(["templates", "--release-repo", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_real_release_clone(tmp_path):
    """Counts and placeholder structure of the real release's lists (no text is checked or kept)."""
    clone = os.environ.get(RELEASE_REPO_ENV)
    if not clone or not Path(clone).is_dir():
        pytest.skip(f"set {RELEASE_REPO_ENV} to a clone of Kami-code/HandsOnVLM-release (checkout or bare git dir)")
    ts = release_templates(clone)
    assert {name: len(values) for name, values in ts.lists().items()} == RELEASE_COUNTS
    structure = {name: [placeholder_names(t) for t in values] for name, values in ts.lists().items()}
    assert structure["action_questions"] == [["narration"]] * 3
    assert structure["action_answers"] == [["narration", "hands"]] * 2
    assert structure["trajectory_answers"] == [["hands"]] * 2
    assert structure["action_prediction_answers"] == [["narration"], ["narration"], ["narration", "noun"]]
    for name in ("general_questions", "follow_up_questions", "action_prediction_questions"):
        assert structure[name] == [[]] * RELEASE_COUNTS[name]
    assert " @ " in ts.source
