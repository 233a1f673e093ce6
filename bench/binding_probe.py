"""Can a randomly initialised LM of a preset's size learn to pick the named object among others?

Issue 16's demo needs the tiny LM to bind a word of the question to one of several objects that only
the frames place. This probe isolates that step from everything else in the pipeline (tower, CVAE,
text loss, generation): perfect visual features and a direct regression of the target's place.

One sample, a [L, D] sequence for the preset's LLaMA (its ``model.lm.config``, random init):

    grid tokens [G*G]   one-hot class of the object in each cell of a 7 x 7 grid (or "empty"),
                        + a 2-D sin-cos code of the cell, through a 2-layer MLP projector
    question    [Q]     random filler words, the target's noun word at a random place,
                        except that with ``--noun-offset N >= 0`` it is the last question word
    answer      [N]     answer words between the noun and the query (``--noun-offset N``; 3 if -1)
    query       [1]     the token whose final hidden state an MLP head maps to the target cell (x, y)

``--noun-offset 0`` makes the query token the noun itself (the state that decodes the trajectory
sits on the object's name); ``--noun-offset -1`` (default) puts the noun anywhere in the question.
Each draw places ``--objects`` objects of distinct classes in distinct cells, the first is the
target; ``--layouts K`` draws from K fixed layouts (a dataset of K scenes) instead of a fresh one
each time. Validation always uses 512 fresh layouts. The score is the mean distance between the
predicted and the true cell (grid units in [0, 1]) with the true question and with the nouns of
another validation sample (``shuffled``): a model that uses the question has ``shuffled / true``
well above 1.

    python -m bench.binding_probe --objects 3 --noun-offset 0 --steps 3000

prints one JSON line per evaluation and a summary line (docs/DATA.md, "The binding in isolation").
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from handsonvlm.config import load_preset

GRID = 7  # the EfficientNet-Lite0 grid of configs/demo.yaml
FILLER_WORDS = 40  # vocabulary of non-noun words; the nouns follow them
CODE_FREQUENCIES = (1.0, 2.0, 4.0)  # x pi: the cell code's frequencies per axis
VALIDATION_SAMPLES = 512
VALIDATION_SEED = 1234
LAYOUT_SEED = 99
WARMUP_STEPS = 100
ANSWER_WORDS = 3  # answer words before the query when the noun may be anywhere in the question


def cell_centres(grid: int = GRID) -> torch.Tensor:
    """[grid*grid, 2]: (x, y) of each cell in [0, 1], row-major."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1).float() / (grid - 1)


def cell_code(cells: torch.Tensor) -> torch.Tensor:
    """cells [N, 2] -> [N, 4 * len(CODE_FREQUENCIES)]: sin and cos of each axis at each frequency."""
    angles = cells[:, :, None] * torch.tensor(CODE_FREQUENCIES) * math.pi  # [N, 2, F]
    return torch.cat([angles.sin().flatten(1), angles.cos().flatten(1)], -1)


def random_layouts(count: int, objects: int, classes: int, generator: torch.Generator):
    """(cells [count, objects], classes [count, objects]): distinct cells and classes per layout."""
    cells = torch.stack([torch.randperm(GRID * GRID, generator=generator)[:objects] for _ in range(count)])
    kinds = torch.stack([torch.randperm(classes, generator=generator)[:objects] for _ in range(count)])
    return cells, kinds


def draw(count: int, objects: int, classes: int, question_length: int, noun_offset: int,
         generator: torch.Generator, layouts=None) -> dict[str, torch.Tensor]:
    """A batch: grid [B, G*G, classes + 1] one-hot (last class = empty), words [B, Q] (noun ids are
    FILLER_WORDS + class), target [B, 2] (the first object's cell centre), target_class [B]."""
    if layouts is None:
        cells, kinds = random_layouts(count, objects, classes, generator)
    else:
        pick = torch.randint(0, layouts[0].shape[0], (count,), generator=generator)
        first = torch.randint(0, objects, (count,), generator=generator)  # which object is the target
        order = (torch.arange(objects)[None] + first[:, None]) % objects
        cells, kinds = layouts[0][pick].gather(1, order), layouts[1][pick].gather(1, order)
    grid = torch.zeros(count, GRID * GRID, classes + 1)
    grid[:, :, classes] = 1.0
    rows = torch.arange(count)[:, None]
    grid[rows, cells] = nn.functional.one_hot(kinds, classes + 1).float()
    words = torch.randint(0, FILLER_WORDS, (count, question_length), generator=generator)
    if noun_offset < 0:
        noun_at = torch.randint(0, question_length, (count,), generator=generator)
    else:
        noun_at = torch.full((count,), question_length - 1)
    words[torch.arange(count), noun_at] = FILLER_WORDS + kinds[:, 0]
    return {"grid": grid, "words": words, "target": cell_centres()[cells[:, 0]], "target_class": kinds[:, 0]}


class BindingModel(nn.Module):
    """Projector + the preset's LLaMA (random init) + a point head on the query token's final state."""

    def __init__(self, lm_config: dict, classes: int, noun_offset: int):
        super().__init__()
        config = LlamaConfig(**{**lm_config, "vocab_size": FILLER_WORDS + classes + 1})
        width = config.hidden_size
        self.lm = LlamaModel(config)
        self.register_buffer("code", cell_code(cell_centres()), persistent=False)
        self.projector = nn.Sequential(nn.Linear(classes + 1 + self.code.shape[1], width), nn.GELU(),
                                       nn.Linear(width, width))
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 2))
        self.query_word = FILLER_WORDS + classes  # the one word never used elsewhere
        self.noun_is_query = noun_offset == 0
        self.answer_words = ANSWER_WORDS if noun_offset < 0 else noun_offset

    def forward(self, grid: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """grid [B, G*G, classes + 1], words [B, Q] -> predicted target cell [B, 2]."""
        batch = grid.shape[0]
        visual = self.projector(torch.cat([grid, self.code.expand(batch, -1, -1)], -1))
        embed = self.lm.get_input_embeddings()
        answer = embed(torch.full((batch, self.answer_words), 0, device=words.device))
        parts = [visual, embed(words), answer]
        if not self.noun_is_query:  # else the last question word, the noun, is the query itself
            parts.append(embed(torch.full((batch, 1), self.query_word, device=words.device)))
        hidden = self.lm(inputs_embeds=torch.cat(parts, 1)).last_hidden_state
        return self.head(hidden[:, -1])


def evaluate(model: BindingModel, validation: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean cell distance with the true nouns and with another sample's (rolled by one)."""
    model.eval()
    with torch.no_grad():
        true = (model(validation["grid"], validation["words"]) - validation["target"]).norm(dim=-1).mean().item()
        shuffled = (model(validation["grid"], validation["words"].roll(1, 0))
                    - validation["target"]).norm(dim=-1).mean().item()
    model.train()
    return {"error": true, "shuffled_error": shuffled, "shuffled_over_true": shuffled / true}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", help="the model preset whose LM size is probed")
    parser.add_argument("--objects", type=int, default=3, help="objects per grid, the target included")
    parser.add_argument("--classes", type=int, default=11, help="object classes (SynthKitchens has 11)")
    parser.add_argument("--layouts", type=int, default=0, help="fixed training layouts (0 = a fresh one per draw)")
    parser.add_argument("--noun-offset", type=int, default=-1,
                        help="tokens between the noun and the query (0: the query is the noun; -1: anywhere)")
    parser.add_argument("--question-length", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--evaluations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.objects <= args.classes:
        parser.error(f"--objects must lie in [1, --classes], got {args.objects}")

    torch.manual_seed(args.seed)
    lm_config = load_preset(args.preset)["model"]["lm"]["config"]
    model = BindingModel(lm_config, args.classes, args.noun_offset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    draw_args = (args.objects, args.classes, args.question_length, args.noun_offset)
    validation = draw(VALIDATION_SAMPLES, *draw_args, torch.Generator().manual_seed(VALIDATION_SEED))
    layouts = None
    if args.layouts:
        layouts = random_layouts(args.layouts, args.objects, args.classes, torch.Generator().manual_seed(LAYOUT_SEED))
    generator = torch.Generator().manual_seed(args.seed)

    started, every, result = time.perf_counter(), max(1, args.steps // args.evaluations), {}
    for step in range(1, args.steps + 1):
        batch = draw(args.batch, *draw_args, generator, layouts)
        loss = (model(batch["grid"], batch["words"]) - batch["target"]).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == args.steps:
            result = {"step": step, "samples": step * args.batch, "train_loss": loss.item(),
                      **evaluate(model, validation), "seconds": time.perf_counter() - started}
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    summary = {"probe": vars(args), **result}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
