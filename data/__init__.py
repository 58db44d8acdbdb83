"""Data pipeline: ESM tokenizer, .bin shards, preparation, download, packed loader, masking.

Knows nothing of models or devices: everything here yields CPU tensors of one fixed shape.
Submodules are imported on demand so that `python -m data.shards` stays light (no torch).
"""
