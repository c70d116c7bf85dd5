"""Ground floor, data: knowledge-conflict items and what is done with their text.

The item schema and its JSONL reader / validator (:mod:`~spare_tl.data.schema`), the built-in,
hub and JSONL datasets (:mod:`~spare_tl.data.datasets`, :mod:`~spare_tl.data.builtin` and its
builder), the prompts and demonstrations (:mod:`~spare_tl.data.prompts`) and exact-match
scoring (:mod:`~spare_tl.data.scoring`). Nothing here loads a model.
"""
