"""EPIC-KITCHENS ingestion, the SynthKitchens synthetic dataset, and the Ray Data preprocessing stages."""
