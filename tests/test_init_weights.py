"""`train.init_weights`: a new run starts from an export's or zero_to_fp32's weights (handsonvlm.training).

Plain PyTorch on the tiny preset: a model trained a few steps is exported (and, as zero_to_fp32 writes
it, saved as a torch state dict of its parameters without the frozen tower); a run with another seed
built from either file must hold exactly the trained values, not its own initial ones. A file that
does not fit the model is refused before anything trains, naming the keys.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from handsonvlm.compat import state_dict_files
from handsonvlm.config import ModelConfig, TrainConfig, load_preset
from handsonvlm.model import VISION_PREFIX, WEIGHTS_FILE, ModelInit
from handsonvlm.training import build_training, load_initial_weights

STEPS = 2


def configs(**train_overrides) -> tuple[TrainConfig, ModelConfig]:
    preset = load_preset("tiny")
    train = TrainConfig.from_dict({**preset["train"], **train_overrides})
    return train, ModelConfig.from_dict(preset["model"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trained parameters, export folder, zero_to_fp32-like .bin file) of the tiny model after a few
    optimizer steps on random parameter updates (what matters is that they differ from any init)."""
    train, cfg = configs(seed=0)
    with torch.random.fork_rng(devices=[]):
        parts = build_training(train, cfg, STEPS)
        with torch.no_grad():
            for param in parts.trainable:  # moved away from the seed's init, as training would
                param.add_(torch.randn_like(param) * 0.1)
    root = tmp_path_factory.mktemp("init_weights")
    export = root / "export"
    parts.model.save_pretrained(export)
    # zero_to_fp32's output: the module's parameters (no frozen tower: DeepSpeed never held it) in fp32
    consolidated = root / "zero_to_fp32" / "pytorch_model.bin"
    consolidated.parent.mkdir()
    torch.save({k: p.detach().float() for k, p in parts.model.named_parameters()}, consolidated)
    return trainable_state(parts.model), export, consolidated


@pytest.mark.parametrize("source", ["export", "zero_to_fp32 folder", "zero_to_fp32 file"])
def test_a_new_run_starts_from_the_given_weights(trained, source):
    state, export, consolidated = trained
    path = {"export": export, "zero_to_fp32 folder": consolidated.parent, "zero_to_fp32 file": consolidated}[source]
    train, cfg = configs(seed=1, init_weights=str(path))
    fresh = trainable_state(build_training(configs(seed=1)[0], cfg, STEPS).model)
    with torch.random.fork_rng(devices=[]):
        parts = build_training(train, cfg, STEPS)
    loaded = trainable_state(parts.model)
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    # the seed-1 initial values really were replaced: no parameter kept them
    assert not any(torch.equal(loaded[k], fresh[k]) for k in state)
    # the optimizer optimises the loaded parameters (built after the load, over the same tensors)
    assert {id(p) for group in parts.optimizer.param_groups for p in group["params"]} == \
        {id(p) for p in parts.trainable}


def test_an_exports_tower_weights_replace_the_configured_towers(trained, tmp_path):
    _, export, _ = trained
    from safetensors.torch import load_file

    weights = load_file(export / WEIGHTS_FILE)
    tower_key = next(k for k in weights if k.startswith(VISION_PREFIX))
    weights[tower_key] = weights[tower_key] + 1.0
    edited = tmp_path / "edited"
    edited.mkdir()
    save_file(weights, str(edited / WEIGHTS_FILE))
    train, cfg = configs(seed=1)
    with torch.random.fork_rng(devices=[]):
        model = build_training(train, cfg, STEPS).model
    assert load_initial_weights(model, edited) == len(trainable_state(model))
    assert torch.equal(model.vision.state_dict()[tower_key[len(VISION_PREFIX):]], weights[tower_key])


def test_sharded_weights_are_read_through_their_index(trained, tmp_path):
    state, export, _ = trained
    from safetensors.torch import load_file

    weights = load_file(export / WEIGHTS_FILE)
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: weights[k] for k in names}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, names in shards.items() for k in names}}))
    assert [p.name for p in state_dict_files(tmp_path)[0]] == sorted(shards)
    train, cfg = configs(seed=1, init_weights=str(tmp_path))
    with torch.random.fork_rng(devices=[]):
        loaded = trainable_state(build_training(train, cfg, STEPS).model)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def consolidated_and_fresh_model(trained) -> tuple:
    """(the zero_to_fp32-style file, its state, a model built with another seed)."""
    _, _, consolidated = trained
    train, cfg = configs(seed=1)
    with torch.random.fork_rng(devices=[]):
        model = build_training(train, cfg, STEPS).model
    return consolidated, torch.load(consolidated, weights_only=True), model


def test_weights_that_do_not_fit_are_refused_with_their_keys(trained, tmp_path):
    _, state, model = consolidated_and_fresh_model(trained)

    dropped = dict(state)
    dropped.pop("projector.weight")
    torch.save(dropped, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"missing \['projector.weight'\]"):
        load_initial_weights(model, tmp_path / "missing.bin")

    resized = {**state, "projector.bias": torch.zeros(3)}
    torch.save(resized, tmp_path / "shape.bin")
    with pytest.raises(ValueError, match=r"wrong shape \['projector.bias \(3,\)"):
        load_initial_weights(model, tmp_path / "shape.bin")

    torch.save({**state, "head.extra": torch.zeros(1)}, tmp_path / "extra.bin")
    with pytest.raises(ValueError, match=r"unexpected \['head.extra'\]"):
        load_initial_weights(model, tmp_path / "extra.bin")

    with pytest.raises(FileNotFoundError, match="no weights there"):
        state_dict_files(tmp_path / "nowhere")


class _OtherRank(ModelInit):
    """A ZeRO-3 rank other than 0: what it writes inside ``modify`` is discarded."""

    def keeps_writes(self) -> bool:
        return False


def test_a_rank_whose_writes_are_discarded_reads_no_lm_tensor_but_checks_shapes(trained, tmp_path):
    consolidated, state, model = consolidated_and_fresh_model(trained)
    before = trainable_state(model)
    assert load_initial_weights(model, consolidated, init=_OtherRank()) == len(before)
    after = trainable_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing read, nothing written
    assert any(not torch.equal(state[k], before[k]) for k in before)  # a read would have changed them

    torch.save({**state, "projector.bias": torch.zeros(3)}, tmp_path / "shape.bin")
    with pytest.raises(ValueError, match=r"wrong shape \['projector.bias \(3,\)"):
        load_initial_weights(model, tmp_path / "shape.bin", init=_OtherRank())


def test_train_py_stops_before_ray_when_the_weights_are_not_there(tmp_path, capsys):
    from pipelines import train

    code = train.main(["--config", "tiny", "--data", str(tmp_path), "--no-mlflow",
                       "--set", f"train.init_weights={tmp_path / 'nowhere'}"])
    assert code == 2
    assert "no weights there" in capsys.readouterr().err
