"""SynthKitchens: a synthetic dataset laid out exactly like EPIC-KITCHENS-100 + hoi-forecast + HandsOnVLM.

Every stage of the pipeline runs on it unchanged, on a CPU, without the real (large, licensed)
data, and the target of each action can only be known from the text, so a model that learns it
must read the narration or the question. ``python -m synthkitchens --out DIR`` writes a tree;
:mod:`synthkitchens.scene` samples the scenes, :mod:`synthkitchens.render` draws them,
:mod:`synthkitchens.generate` writes the files and :mod:`synthkitchens.gap_report` checks that
the text still matters.
"""
