"""Real-data ingestion (EPIC-KITCHENS, hoi-forecast labels, HandsOnVLM questions) and the Ray Data preprocessing stages.

The synthetic EPIC-format dataset used for demos and tests is the separate package ``synthkitchens``.
"""
