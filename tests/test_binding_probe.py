"""bench/binding_probe.py: its samples say what its docstring says, and a short run reports sane numbers."""

from __future__ import annotations

import torch

from bench import binding_probe as probe

CLASSES = 11
OBJECTS = 3
QUESTION = 12


def _objects_in(grid: torch.Tensor) -> torch.Tensor:
    """grid [B, G*G, classes + 1] -> [B] count of non-empty cells."""
    return (grid[..., :CLASSES].sum(-1) > 0).sum(-1)


def test_cell_centres_are_row_major_in_unit_square():
    centres = probe.cell_centres()
    assert centres.shape == (probe.GRID * probe.GRID, 2)
    assert centres[0].tolist() == [0.0, 0.0]
    assert torch.allclose(centres[1], torch.tensor([1.0 / (probe.GRID - 1), 0.0]))  # x moves first
    assert centres[-1].tolist() == [1.0, 1.0]


def test_draw_places_the_target_and_names_it_last_at_offset_zero():
    batch = probe.draw(64, OBJECTS, CLASSES, QUESTION, 0, torch.Generator().manual_seed(0))
    assert _objects_in(batch["grid"]).tolist() == [OBJECTS] * 64
    # The noun (the target's class) is the question's last word; no other word is a noun.
    assert torch.equal(batch["words"][:, -1], probe.FILLER_WORDS + batch["target_class"])
    assert bool((batch["words"][:, :-1] < probe.FILLER_WORDS).all())
    # The target is the centre of the cell that holds the target's class.
    cell = batch["grid"][torch.arange(64), :, batch["target_class"]].argmax(-1)
    assert torch.equal(batch["target"], probe.cell_centres()[cell])


def test_draw_from_fixed_layouts_reuses_them_with_any_object_as_target():
    layouts = probe.random_layouts(2, OBJECTS, CLASSES, torch.Generator().manual_seed(1))
    batch = probe.draw(200, OBJECTS, CLASSES, QUESTION, -1, torch.Generator().manual_seed(2), layouts)
    occupied = {tuple(sorted(row.nonzero().flatten().tolist())) for row in batch["grid"][..., :CLASSES].sum(-1)}
    assert occupied == {tuple(sorted(cells.tolist())) for cells in layouts[0]}
    assert set(batch["target_class"].tolist()) == set(layouts[1].flatten().tolist())  # every object is asked for


def test_short_run_reports_errors_in_range():
    summary = probe.main(["--steps", "4", "--batch", "4", "--evaluations", "1", "--noun-offset", "0"])
    assert summary["step"] == 4 and summary["samples"] == 16
    # Distances between points of the unit square, and a ratio of two of them.
    assert 0.0 < summary["error"] < 2 ** 0.5 and 0.0 < summary["shuffled_error"] < 2 ** 0.5
    assert 0.5 < summary["shuffled_over_true"] < 2.0
