"""The language-model side of a patched model: where visual tokens are reduced inside a
Llama-family decoder (the `features` and `llm` sites of a vision-language model) and what a
KV-cache policy reads there.

- `context.py`: what reaches the language model from outside its forward (`LlmInputs`, `LlmCall`,
  the context variables);
- `attention.py`: the routed attention every patched layer runs, and the attention tokens receive;
- `segments.py`: the tokens between two sites (`Segment`), dropping slots, and the masks;
- `features.py`: the features site (a vision method on the image features before layer 0);
- `decoder.py`: the decoder loop (`PruningDecoder`) that runs every site;
- `decoders.py`: the decoders it runs, one row each (`DECODERS`, keyed by `config.model_type`).

Nothing here knows a model family's prompt or tower (`tome_plus.vlm`) or a method by name.
"""
