"""The HF path's answers for the vLLM tests, run by the project's own environment (transformers
and tome_plus's HF backend): `python hf_reference.py MODEL_DIR OPTIONS_JSON NEW_TOKENS [image|video]`
prints a JSON list, per prompt of `tiny.prompts(family, kind)` (each alone), of the greedy new
token ids, each one's log-probability and the prompt's length as the language model ran it (visual
tokens reduced). OPTIONS_JSON: "null" (unpatched) or {"method": ..., budget...}, patched at
site="features" with the positions vLLM gives kept tokens: "packed" (consecutive) on the 1-D rotary
families, "kept" (each token's own (t, h, w)) on Qwen's M-RoPE."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402


def main(path: str, options: str, new_tokens: str, kind: str = "image") -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import tome_plus
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    settings = json.loads(options)
    if settings is not None:
        method = settings.pop("method")
        site = settings.pop("site", "features")
        if site == "features":
            settings["positions"] = "kept" if model.config.model_type.startswith("qwen") else "packed"
        tome_plus.patch(model, method, site=site, **settings)
    out = []
    for text, media in tiny.prompts(model.config.model_type, kind):
        if kind == "image":
            inputs = processor(images=[tiny.image(*s) for s in media], text=text, return_tensors="pt")
        else:
            metadata = {}
            if model.config.model_type.startswith("qwen"):  # the clip's frame rate, as vLLM is given it
                metadata = dict(video_metadata=[tiny.video_metadata(media[0])], do_sample_frames=False)
            inputs = processor(videos=[tiny.video(*media)], text=text, return_tensors="pt", **metadata)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=int(new_tokens), do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        ids = gen.sequences[0, inputs["input_ids"].shape[1]:]
        logprobs = [float(torch.log_softmax(s[0].float(), -1)[i]) for s, i in zip(gen.scores, ids)]
        prompt = int(inputs["input_ids"].shape[1])
        if settings is not None:  # the prompt the language model ran: its visual tokens reduced
            token = model.config.image_token_id if kind == "image" else model.config.video_token_id
            visual = int((inputs["input_ids"] == token).sum())
            seen = tome_plus.inspect(model)
            kept = seen.image_tokens[0] if seen.llm_kept is None else seen.llm_kept[0][0]  # the tower's, the site's
            prompt += int(kept) - visual
        out.append({"ids": ids.tolist(), "logprobs": logprobs, "prompt": prompt,
                    "full": int(inputs["input_ids"].shape[1])})
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
