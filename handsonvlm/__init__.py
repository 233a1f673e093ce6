"""HandsOnVLM model library: config, model, prompts, data->tensors, generation, metrics (no Ray imports)."""
