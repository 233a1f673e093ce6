"""Typed preset sections and the command-line flags derived from them (handsonvlm.config)."""

from __future__ import annotations

import argparse

import pytest

from handsonvlm.config import (
    CONFIG_DIR,
    EvalConfig,
    ModelConfig,
    PredictConfig,
    TrainConfig,
    add_section_flags,
    load_model_config,
    load_section,
    section_overrides,
)
from handsonvlm.constants import DECODER_KINDS, MODES, NUM_FUTURE_POINTS

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_defaults_validate_and_build_the_tiny_model():
    cfg = ModelConfig()
    assert cfg.lm.config == load_model_config("tiny").lm.config
    assert cfg.vision.config == load_model_config("tiny").vision.config
    assert cfg.num_future_points == NUM_FUTURE_POINTS == 4
    for cls in (TrainConfig, EvalConfig, PredictConfig):
        cls()  # no exception


def test_one_enumeration_of_modes_and_decoders():
    assert MODES == ("release", "corrected") and DECODER_KINDS == ("cvae", "mlp")
    with pytest.raises(ValueError, match="model.mode must be one of"):
        ModelConfig(mode="faithful")
    with pytest.raises(ValueError, match="model.traj_decoder must be one of"):
        ModelConfig(traj_decoder="diffusion")
    with pytest.raises(ValueError, match="exactly one of"):
        ModelConfig(lm={"pretrained": "/x", "config": {"hidden_size": 8}})


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_valid_model_train_and_eval_sections(preset):
    load_model_config(preset)
    load_section(TrainConfig, preset, "train")
    cfg = load_section(EvalConfig, preset, "eval")
    # None: the mode's default, resolved by handsonvlm.inference.resolve_sampling (64 corrected, 100 release)
    assert cfg.tasks == ("vhp", "rbhp") and cfg.max_new_tokens is None and cfg.split == "validation"


def test_flags_come_from_the_fields_and_only_given_flags_override():
    names = ("num_samples", "temperature", "task", "limit", "shuffle_questions")
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "eval", EvalConfig, names)
    args = parser.parse_args(["--num-samples", "3", "--task", "rbhp", "--shuffle-questions"])
    assert section_overrides(args, "eval", names) == [
        "eval.num_samples=3", 'eval.task="rbhp"', "eval.shuffle_questions=true"]
    cfg = load_section(EvalConfig, "tiny", "eval", section_overrides(args, "eval", names))
    assert (cfg.num_samples, cfg.task, cfg.shuffle_questions, cfg.temperature) == (3, "rbhp", True, 0.5)
    with pytest.raises(SystemExit):  # choices come from the field's metadata
        parser.parse_args(["--task", "dvc"])
    with pytest.raises(SystemExit):  # so does the type
        parser.parse_args(["--num-samples", "many"])
    assert "(eval.limit: the preset's value, else None)" in " ".join(parser.format_help().split())


def test_string_flags_stay_strings():
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "train", TrainConfig, ("data",))
    args = parser.parse_args(["--data", "1e-3"])  # a path that YAML would read as a number
    overrides = section_overrides(args, "train", ("data",))
    assert overrides == ['train.data="1e-3"']
    assert load_section(TrainConfig, "tiny", "train", overrides).data == "1e-3"
    assert load_section(TrainConfig, "tiny", "train", ["train.lr=1e-3"]).lr == 1e-3  # unquoted: a number


def test_bad_values_name_their_key():
    with pytest.raises(ValueError, match="eval.num_samples must be of type int"):
        load_section(EvalConfig, "tiny", "eval", ["eval.num_samples=abc"])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        PredictConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        EvalConfig(top_p=0)
    with pytest.raises(ValueError, match="unknown eval config keys"):
        EvalConfig.from_dict({"k": 3})
    with pytest.raises(ValueError, match="predict.draw must be one of"):
        PredictConfig(draw="all")
