"""The vision-language side of a patched model (the `backends.hf_llava` family): where a method
goes and what each site needs at `patch` (`sites.py`), what one image puts into the language
model (`images.py`), the prompt's placeholders and what the language model is told of them
(`prompt.py`), the patched calls, `forward` and `generate` (`calls.py`), and the families, one
row each (`families.py`, keyed by `config.model_type`).
"""
