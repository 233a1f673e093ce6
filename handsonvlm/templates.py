"""The question/answer template lists a conversation is made of, as data (:class:`TemplateSet`).

Two sets exist: the project's own wordings (:data:`PROJECT_TEMPLATES`, from
:mod:`handsonvlm.prompts`) and the released HandsOnVLM's, which are its training distribution but
are not shipped here. The release's are read from the user's own clone, without importing or
executing it (:func:`release_templates`, ``python -m handsonvlm.compat templates``), and kept in a
JSON file (:func:`save_templates` / :func:`read_templates`) that ``data.templates`` names.

Every template uses named placeholders only: ``{narration}`` (the action's narration),
``{hands}`` (the hand tokens) and ``{noun}`` (the clip's EPIC noun). The release's positional
``{}`` are named while parsing, in the order its code passes the ``.format`` arguments.
"""

from __future__ import annotations

import ast
import json
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from handsonvlm import prompts

TEMPLATES_FORMAT = "handsonvlm-templates/1"
PROJECT_SOURCE = "project"

NARRATION = "narration"
HANDS = "hands"
NOUN = "noun"


@dataclass(frozen=True)
class Placeholders:
    """The placeholders a list's templates may use: ``required`` ones exactly once each,
    ``optional`` ones at most once."""

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


# Per list: which placeholders its templates take. A hand placeholder must occur exactly once,
# because the answer's hand tokens are counted (one per future point) when the hands are decoded.
LIST_PLACEHOLDERS = {
    "action_questions": Placeholders(required=(NARRATION,)),
    "action_answers": Placeholders(required=(HANDS,), optional=(NARRATION,)),
    "general_questions": Placeholders(),
    "trajectory_answers": Placeholders(required=(HANDS,)),
    "action_prediction_questions": Placeholders(),
    "action_prediction_answers": Placeholders(required=(NARRATION,), optional=(NOUN,)),
    "follow_up_questions": Placeholders(),
}
TEMPLATE_LISTS = tuple(LIST_PLACEHOLDERS)


class TemplateError(ValueError):
    """A template list, a template file or a release source that cannot be used."""


class TemplatesFileMissing(FileNotFoundError):
    """Release mode without a ``data.templates`` file, or a ``data.templates`` that does not exist."""


def placeholder_names(template: str) -> list[str]:
    """The replacement-field names of ``template`` in order (``""`` for a positional ``{}``)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_template(list_name: str, template, spec: Placeholders) -> None:
    where = f"template list {list_name!r}, template {template!r}"
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"{where}: a template must be a non-empty string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # unbalanced braces
        raise TemplateError(f"{where}: not a format string ({error}); write a literal brace as '{{{{' or '}}}}'"
                            ) from None
    allowed = spec.required + spec.optional
    for _, name, format_spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise TemplateError(f"{where}: positional placeholder {{{name}}}; use named ones {sorted(allowed)}")
        if name not in allowed:
            raise TemplateError(f"{where}: unknown placeholder {{{name}}}; "
                                f"this list allows {sorted(allowed) if allowed else 'none'}")
        if format_spec or conversion:
            raise TemplateError(f"{where}: placeholder {{{name}}} has a conversion or format spec; write {{{name}}}")
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in spec.required:
        if names.count(name) != 1:
            raise TemplateError(f"{where}: must contain {{{name}}} exactly once, found {names.count(name)}")
    for name in spec.optional:
        if names.count(name) > 1:
            raise TemplateError(f"{where}: {{{name}}} may occur at most once, found {names.count(name)}")


@dataclass(frozen=True)
class TemplateSet:
    """The seven template lists of a conversation mixture, validated on construction.

    Guarantees: every list is a non-empty tuple of strings whose placeholders are the ones
    :data:`LIST_PLACEHOLDERS` allows it (required ones exactly once, e.g. ``{hands}`` in every
    trajectory answer), and at least one action-prediction answer needs no ``{noun}`` (so a clip
    without a noun can still be answered). Lists may be given as any sequence; they are stored as
    tuples. ``source`` says where the wordings come from (``"project"`` or ``"release PATH @ COMMIT"``).
    """

    action_questions: tuple[str, ...]
    action_answers: tuple[str, ...]
    general_questions: tuple[str, ...]
    trajectory_answers: tuple[str, ...]
    action_prediction_questions: tuple[str, ...]
    action_prediction_answers: tuple[str, ...]
    follow_up_questions: tuple[str, ...]
    source: str = PROJECT_SOURCE

    def __post_init__(self):
        for name in TEMPLATE_LISTS:
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise TemplateError(f"template list {name!r} must be a sequence of strings, got {type(value).__name__}")
            value = tuple(value)
            if not value:
                raise TemplateError(f"template list {name!r} is empty")
            for template in value:
                _check_template(name, template, LIST_PLACEHOLDERS[name])
            object.__setattr__(self, name, value)
        if not self.answers_without_noun():
            raise TemplateError("template list 'action_prediction_answers': every template needs {noun}; "
                                "at least one must do without, for clips that have no noun")
        if not isinstance(self.source, str):
            raise TemplateError(f"source must be a string, got {type(self.source).__name__}")

    def lists(self) -> dict[str, tuple[str, ...]]:
        """List name -> templates, in :data:`TEMPLATE_LISTS` order."""
        return {name: getattr(self, name) for name in TEMPLATE_LISTS}

    def answers_without_noun(self) -> tuple[str, ...]:
        """The action-prediction answers that need no ``{noun}``."""
        return tuple(t for t in self.action_prediction_answers if NOUN not in placeholder_names(t))

    def action_prediction_answers_for(self, has_noun: bool) -> tuple[str, ...]:
        """The action-prediction answers usable for a clip: all of them when it has a noun, else
        those without ``{noun}`` (the release's inline list, which names ``action.noun``)."""
        return self.action_prediction_answers if has_noun else self.answers_without_noun()


def differing_lists(first: TemplateSet, second: TemplateSet) -> tuple[str, ...]:
    """The names of the lists (in :data:`TEMPLATE_LISTS` order) whose templates differ, order included."""
    return tuple(name for name in TEMPLATE_LISTS if getattr(first, name) != getattr(second, name))


def name_positional_fields(template: str, names: tuple[str, ...]) -> str:
    """``template`` with its positional fields (``{}``, ``{0}``, ...) renamed to ``names`` by
    argument position, as ``template.format(*args)`` would fill them; literal braces stay escaped,
    named fields are kept. Raises :class:`TemplateError` for a position beyond ``names``."""
    pieces = []
    next_auto = 0
    for literal, name, format_spec, conversion in string.Formatter().parse(template):
        pieces.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if name == "":
            position, next_auto = next_auto, next_auto + 1
        elif name.isdigit():
            position = int(name)
        else:
            position = None
        if position is not None:
            if position >= len(names):
                raise TemplateError(f"template {template!r}: positional field {position} has no argument "
                                    f"(the code passes {len(names)}: {', '.join(names) or 'none'})")
            name = names[position]
        pieces.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "")
                      + "}")
    return "".join(pieces)


# The project's wordings. prompts.ACTION_QUESTIONS keeps its positional "{}" (callers fill it
# with ``.format(narration)``), so it is named here like the release's lists are.
PROJECT_TEMPLATES = TemplateSet(
    action_questions=tuple(name_positional_fields(t, (NARRATION,)) for t in prompts.ACTION_QUESTIONS),
    action_answers=prompts.ACTION_ANSWERS,
    general_questions=prompts.GENERAL_QUESTIONS,
    trajectory_answers=prompts.TRAJECTORY_ANSWERS,
    action_prediction_questions=prompts.ACTION_PREDICTION_QUESTIONS,
    action_prediction_answers=prompts.ACTION_PREDICTION_ANSWERS + prompts.ACTION_PREDICTION_NOUN_ANSWERS,
    follow_up_questions=prompts.FOLLOW_UP_TRAJECTORY_QUESTIONS,
    source=PROJECT_SOURCE,
)


# ---- JSON file ------------------------------------------------------------------------------------
_HOW_TO_MAKE_TEMPLATES = ("make it from a clone of Kami-code/HandsOnVLM-release with "
                          "`python -m handsonvlm.compat templates --release-repo PATH --out templates.json`, "
                          "then pass `--set data.templates=templates.json`")


def save_templates(templates: TemplateSet, path: str | Path) -> Path:
    """Write ``templates`` as ``{"format", "source", "templates": {list: [..]}}`` JSON; returns the path.
    :func:`read_templates` of the file gives an equal :class:`TemplateSet`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": TEMPLATES_FORMAT, "source": templates.source,
                "templates": {name: list(value) for name, value in templates.lists().items()}}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_templates(path: str | Path) -> TemplateSet:
    """The :class:`TemplateSet` of a file :func:`save_templates` wrote, validated. Raises
    :class:`TemplatesFileMissing` for a missing file and :class:`TemplateError` for a wrong format
    tag, a missing or unknown list, or an invalid template."""
    path = Path(path)
    if not path.is_file():
        raise TemplatesFileMissing(f"template file {str(path)!r} does not exist; {_HOW_TO_MAKE_TEMPLATES}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TemplateError(f"template file {str(path)!r} is not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != TEMPLATES_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise TemplateError(f"template file {str(path)!r}: format {found!r}, expected {TEMPLATES_FORMAT!r}")
    lists = document.get("templates")
    if not isinstance(lists, dict):
        raise TemplateError(f"template file {str(path)!r}: 'templates' must be an object of lists")
    missing = [name for name in TEMPLATE_LISTS if name not in lists]
    unknown = sorted(set(lists) - set(TEMPLATE_LISTS))
    if missing or unknown:
        raise TemplateError(f"template file {str(path)!r}: missing lists {missing}, unknown lists {unknown}")
    try:
        return TemplateSet(**{name: lists[name] for name in TEMPLATE_LISTS},
                           source=str(document.get("source", str(path))))
    except TemplateError as error:
        raise TemplateError(f"template file {str(path)!r}: {error}") from None


def templates_for(model_cfg, data_cfg=None) -> TemplateSet:
    """The templates a run uses: the file ``data_cfg.templates`` when given; else, in release mode
    (``model_cfg.mode == "release"``), :class:`TemplatesFileMissing` saying how to make that file
    (the release's wordings are not shipped); else :data:`PROJECT_TEMPLATES`."""
    path = getattr(data_cfg, "templates", None)
    if path:
        return read_templates(path)
    if model_cfg.mode == "release":
        raise TemplatesFileMissing("release mode trains on the release's own question/answer templates, "
                                   "which are read from your clone and not shipped here: data.templates is not set; "
                                   + _HOW_TO_MAKE_TEMPLATES)
    return PROJECT_TEMPLATES


# ---- the release's sources ------------------------------------------------------------------------
RELEASE_CONSTANTS_FILE = "handsonvlm/constants.py"
RELEASE_DATASET_FILE = "handsonvlm/dataset/epic_dataset.py"
# Our list <- (the release's module-level list in constants.py, the names of the arguments its
# dataset code passes to ``.format``, in order: e.g. ``.format(narration, hand_traj_str)``).
RELEASE_CONSTANT_LISTS = {
    "action_questions": ("action_question_templates", (NARRATION,)),
    "action_answers": ("action_answer_templates", (NARRATION, HANDS)),
    "general_questions": ("general_question_templates", ()),
    "trajectory_answers": ("general_trajectory_answer_templates", (HANDS,)),
    "action_prediction_questions": ("action_prediction_templates", ()),
    "follow_up_questions": ("general_specific_question_templates", ()),
}
# The release builds its action-prediction answers inline, per clip:
# ``action_prediction_answer_templates.append("...".format(narration, action.noun))``.
RELEASE_INLINE_LIST = "action_prediction_answer_templates"
RELEASE_FORMAT_ARGUMENTS = {"narration": NARRATION, "action.noun": NOUN}


def _module_string_lists(source: str, filename: str) -> dict[str, list[str]]:
    """Module-level ``NAME = [<str>, ...]`` (or tuple) assignments of ``source``, by name; a list
    holding anything but string constants is left out (it cannot be a template list)."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as error:
        raise TemplateError(f"{filename}: cannot parse ({error})") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if (isinstance(target, ast.Name) and isinstance(value, ast.List | ast.Tuple)
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts)):
            found[target.id] = [e.value for e in value.elts]
    return found


def _inline_answers(source: str, filename: str) -> list[str]:
    """The templates of every ``action_prediction_answer_templates.append(<str>.format(args))``
    call (or ``.append(<str>)``) in ``source``, with the ``.format`` arguments named by
    :data:`RELEASE_FORMAT_ARGUMENTS`."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as error:
        raise TemplateError(f"{filename}: cannot parse ({error})") from None
    answers = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == RELEASE_INLINE_LIST):
            continue
        where = f"{filename}:{node.lineno}"
        if len(node.args) != 1 or node.keywords:
            raise TemplateError(f"{where}: {RELEASE_INLINE_LIST}.append takes one template")
        value = node.args[0]
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            answers.append(value.value)
            continue
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "format"
                and isinstance(value.func.value, ast.Constant) and isinstance(value.func.value.value, str)):
            raise TemplateError(f"{where}: expected {RELEASE_INLINE_LIST}.append(\"...\".format(...)), "
                                f"got {ast.unparse(value)[:80]!r}")
        if value.keywords:
            raise TemplateError(f"{where}: keyword arguments to .format are not supported")
        names = []
        for argument in value.args:
            expression = ast.unparse(argument)
            if expression not in RELEASE_FORMAT_ARGUMENTS:
                raise TemplateError(f"{where}: unknown .format argument {expression!r}; "
                                    f"known: {sorted(RELEASE_FORMAT_ARGUMENTS)}")
            names.append(RELEASE_FORMAT_ARGUMENTS[expression])
        try:
            answers.append(name_positional_fields(value.func.value.value, tuple(names)))
        except TemplateError as error:
            raise TemplateError(f"{where}: {error}") from None
    if not answers:
        raise TemplateError(f"{filename}: no {RELEASE_INLINE_LIST}.append(...) calls found")
    return answers


def parse_release_sources(constants_source: str, dataset_source: str, source: str = "release") -> TemplateSet:
    """The release's templates from the text of its ``handsonvlm/constants.py`` and
    ``handsonvlm/dataset/epic_dataset.py``, read with :mod:`ast` only (nothing is imported or run).

    Positional ``{}`` become named placeholders by the release's argument order
    (:data:`RELEASE_CONSTANT_LISTS`, :data:`RELEASE_FORMAT_ARGUMENTS`). Raises
    :class:`TemplateError` naming the file and list when a list is missing or invalid."""
    constant_lists = _module_string_lists(constants_source, RELEASE_CONSTANTS_FILE)
    lists = {}
    for ours, (theirs, argument_names) in RELEASE_CONSTANT_LISTS.items():
        if theirs not in constant_lists:
            raise TemplateError(f"{RELEASE_CONSTANTS_FILE}: no module-level list of strings {theirs!r} "
                                f"(for {ours!r})")
        try:
            lists[ours] = tuple(name_positional_fields(t, argument_names) for t in constant_lists[theirs])
        except TemplateError as error:
            raise TemplateError(f"{RELEASE_CONSTANTS_FILE}, list {theirs!r}: {error}") from None
    lists["action_prediction_answers"] = tuple(_inline_answers(dataset_source, RELEASE_DATASET_FILE))
    try:
        return TemplateSet(**lists, source=source)
    except TemplateError as error:
        raise TemplateError(f"release templates ({source}): {error}") from None


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess | None:
    """``git -C repo args``; None when git is not installed."""
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, encoding="utf-8",
                              check=False)
    except FileNotFoundError:
        return None


def _git_output(repo: Path, *args: str) -> str | None:
    result = _git(repo, *args)
    return result.stdout.strip() if result is not None and result.returncode == 0 else None


def _is_bare_git_dir(repo: Path) -> bool:
    return _git_output(repo, "rev-parse", "--is-bare-repository") == "true"


def release_templates(repo: str | Path, rev: str | None = None) -> TemplateSet:
    """The release's templates from a clone at ``repo``.

    ``rev`` None: the working tree's files, or ``HEAD`` of a bare git dir (a mirror); ``source``
    records the checkout's ``HEAD`` commit when it is a git repository, with ``+ local changes``
    when the two files differ from it. ``rev`` given: the files at that revision (``git show``).
    Raises :class:`FileNotFoundError` for a missing directory or file, :class:`TemplateError` for
    unusable contents."""
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise FileNotFoundError(f"release repository {str(repo)!r} is not a directory")
    files = (RELEASE_CONSTANTS_FILE, RELEASE_DATASET_FILE)
    if rev is None and not (repo / RELEASE_CONSTANTS_FILE).is_file() and _is_bare_git_dir(repo):
        rev = "HEAD"
    if rev is None:
        texts = []
        for name in files:
            if not (repo / name).is_file():
                raise FileNotFoundError(f"{str(repo / name)!r} not found: is {str(repo)!r} a checkout of "
                                        "Kami-code/HandsOnVLM-release? (a bare git dir needs --rev)")
            texts.append((repo / name).read_text(encoding="utf-8"))
        commit = _git_output(repo, "rev-parse", "HEAD")
        source = f"release {repo}"
        if commit:
            changed = _git(repo, "diff", "--quiet", "HEAD", "--", *files)
            source += f" @ {commit}" + (" + local changes" if changed is not None and changed.returncode == 1 else "")
    else:
        commit = _git_output(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
        if commit is None:
            raise FileNotFoundError(f"{str(repo)!r} is not a git repository with revision {rev!r}")
        texts = []
        for name in files:
            shown = _git(repo, "show", f"{commit}:{name}")
            if shown is None or shown.returncode != 0:
                raise FileNotFoundError(f"{name} not found at {rev} ({commit}) in {str(repo)!r}")
            texts.append(shown.stdout)
        source = f"release {repo} @ {commit}"
    return parse_release_sources(*texts, source=source)
