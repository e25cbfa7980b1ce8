"""lmms-eval on a patched VLM with nothing from a hub: a tiny random LLaVA saved with its
processor, a local four-image task, and the harness run unpatched and through tome_plus.

    pip install -e ".[eval]"
    python examples/lmms_eval_offline.py --out /tmp/lmms-tiny

It writes `model/` (a LLaVA checkpoint with a word-level tokenizer) and `tasks/` (the task
`tiny_vqa`: its YAML, its `utils.py` and the images as a `datasets` folder) under `--out`, scores
lmms-eval's own `llava_hf` and the `tome_plus` model at `--model-args`, and prints the CLI line
that does the same, for a real checkpoint and task in place of the tiny ones. Random weights: the
scores show that the harness runs, not what the method is worth.

`save_qwen3_vl`, `save_internvl`, `save_gemma3` and `save_qwen3_5` save a tiny Qwen3-VL, InternVL,
Gemma 3 or Qwen3.5 (built by the caller) the same way, for lmms-eval's `qwen3_vl`, `internvl_hf`,
`gemma3` and `qwen3_5` models (`base=qwen3_vl`, ...).
"""
from __future__ import annotations

import argparse
import os
import textwrap
from typing import Any, Callable, Dict, Optional, Sequence

import torch

IMAGE_ID = 199  # the placeholder token, the tiny models' last id
# the other vision tokens (Qwen3-VL's, InternVL's, Gemma 3's), numbered as in tests/vlm_models.py
VIDEO_ID, VISION_START, VISION_END = 198, 197, 196
NEWLINES = 195  # Gemma 3's "\n\n" around each image block (one token in Gemma's own vocabulary)
WORDS = ["USER:", "ASSISTANT:", "what", "is", "this", "a", "cat", "dog", "red", "blue", "yes", "no", "?", "SYSTEM:"]


def chat_template(image: str, video: str = "") -> str:
    """A chat template writing `image` (`video`) for an image (video) item; content as a string
    (lmms-eval's simple models) or as items (its chat models)."""
    return ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'system' %}SYSTEM: "
            "{% else %}ASSISTANT: {% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'video' %}"
            + video + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


TEMPLATE = chat_template("<image>\n")


def tokenizer(special: Dict[str, int], size: int, padding_side: str = "right", **named: str):
    """A word-level tokenizer of `size` ids: `special` at their ids, WORDS, and `w<id>` at every
    other id (each id a random model emits decodes to a word, so answers differ when ids do);
    `named` become the tokenizer's named special tokens (InternVL's `start_image_token`, ...)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **special}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    taken = set(vocab.values())
    vocab.update({f"w{i}": i for i in range(size) if i not in taken})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in special])  # found inside words too
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side=padding_side, extra_special_tokens=named or None)


def byte_level_tokenizer(special: Dict[str, int], size: int):
    """A byte-level BPE tokenizer of `size` ids without merges: `special` at their ids, one id per
    printable ASCII character, space and newline (any ASCII prompt encodes, a character a token),
    and " w<id>" at every other id (decoded only). For checkpoints whose tokenizer transformers
    always rebuilds as a byte-level BPE from the saved vocabulary and merges (Qwen3.5's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **special}
    # the byte-level alphabet writes space and newline as chr(0x100 + byte), the rest of ASCII as itself
    chars = [chr(0x120), chr(0x10A)] + [chr(c) for c in range(0x21, 0x7F)]
    free = iter([i for i in range(size) if i not in vocab.values()])
    vocab.update({c: next(free) for c in chars})
    vocab.update({f"{chr(0x120)}w{i}": i for i in free})
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>", "<unk>", *special)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llava():
    """A random LLaVA: CLIP at 64 px in 8 px patches (64 image tokens), a 4-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=200, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID)
    return LlavaForConditionalGeneration(config).eval()


def _save(path: str, model, processor) -> None:
    """`model` and `processor` under `path`; greedy decoding never emits a vision token (a random
    model would otherwise, and a generated placeholder is refused)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vision = {getattr(model.config, k, None) for k in names} - {None}
    model.generation_config.suppress_tokens = sorted(vision | set(model.generation_config.suppress_tokens or ()))
    model.save_pretrained(path)
    processor.save_pretrained(path)


def save_model(path: str, model=None) -> None:
    """`model` (default `tiny_llava()`, 64 px images) with a word-level tokenizer and a CLIP image
    processor, as `from_pretrained` reads them."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    model = tiny_llava() if model is None else model
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    tok = tokenizer({"<image>": model.config.image_token_id}, model.config.text_config.vocab_size)
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TEMPLATE, image_token="<image>")
    _save(path, model, processor)


def save_qwen3_vl(path: str, model, make_tokenizer: Callable = tokenizer) -> None:
    """A Qwen3-VL `model` with `make_tokenizer`'s tokenizer (word-level by default; Qwen's vision
    tokens at the config's ids) and Qwen's image and video processors at the tower's patch, merge and temporal
    patch. lmms-eval's `qwen3_vl` resizes images itself (qwen_vl_utils, to multiples of 32 px: its
    patch 16 x merge 2) and calls the processor with `do_resize=False`; a multiple of 32 px is one
    of the tiny tower's 16 px too."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    config, vision = model.config, model.config.vision_config
    special = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
               "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}
    factor = vision.patch_size * vision.spatial_merge_size
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size,
                 size={"shortest_edge": 4 * factor ** 2, "longest_edge": 64 * factor ** 2})
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                                 video_processor=Qwen3VLVideoProcessor(**sizes),
                                 tokenizer=make_tokenizer(special, config.text_config.vocab_size),
                                 chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                                                             "<|vision_start|><|video_pad|><|vision_end|>"))
    _save(path, model, processor)


def save_internvl(path: str, model) -> None:
    """An InternVL `model` with a word-level tokenizer holding the named tokens InternVLProcessor
    reads (`<IMG_CONTEXT>` at the config's image id; `<img>`, `</img>`, `<video>` at VISION_START,
    VISION_END, VIDEO_ID, which the model never sees as ids of its own) and a GotOcr2 image processor
    tiling at the tower's size (`image_seq_length` tokens a tile)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    config = model.config
    side = config.vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    special = {"<IMG_CONTEXT>": config.image_token_id, "<img>": VISION_START, "</img>": VISION_END,
               "<video>": VIDEO_ID}
    tok = tokenizer(special, config.text_config.vocab_size, start_image_token="<img>", end_image_token="</img>",
                    context_image_token="<IMG_CONTEXT>", video_token="<video>")
    size = {"height": side, "width": side}
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True),
                                  video_processor=InternVLVideoProcessor(size=size), tokenizer=tok,
                                  image_seq_length=config.image_seq_length,
                                  chat_template=chat_template("<IMG_CONTEXT>\n", "<video>\n"))
    _save(path, model, processor)


def save_qwen3_5(path: str, model) -> None:
    """A Qwen3.5 `model` as `save_qwen3_vl` saves a Qwen3-VL (Qwen3.5 has Qwen3-VL's processor),
    with a byte-level tokenizer: transformers loads every qwen3_5 checkpoint's tokenizer as its
    Qwen3_5Tokenizer, which keeps only the saved vocabulary, merges and added tokens (a word-level
    vocabulary would lose its words)."""
    save_qwen3_vl(path, model, byte_level_tokenizer)


def save_gemma3(path: str, model) -> None:
    """A Gemma 3 `model` with a word-level tokenizer holding the named tokens Gemma3Processor reads
    (`boi_token`, `image_token` (the soft token, at the config's image id), `eoi_token`; "\\n\\n" at
    NEWLINES) and padding on the left, as Gemma's own (lmms-eval's `gemma3` pads every prompt to a
    multiple of 8 tokens and generates after its last column), and a Gemma 3 image processor at
    the tower's size (`mm_tokens_per_image` tokens an image; no pan-and-scan, Gemma's default)."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    config = model.config
    side = config.vision_config.image_size
    special = {"\n\n": NEWLINES, "<start_of_image>": config.boi_token_index,
               "<image_soft_token>": config.image_token_index, "<end_of_image>": config.eoi_token_index}
    tok = tokenizer(special, config.text_config.vocab_size, padding_side="left", boi_token="<start_of_image>",
                    eoi_token="<end_of_image>", image_token="<image_soft_token>")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": side, "width": side}),
                                tokenizer=tok, image_seq_length=config.mm_tokens_per_image,
                                chat_template=chat_template("<start_of_image>"))
    _save(path, model, processor)


def save_task(folder: str) -> None:
    """`tiny_vqa` on four random images: generate up to 4 words, scored by exact match (`match`)
    and answer length (`words`)."""
    from datasets import Dataset, DatasetDict
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray((torch.rand(48, 40, 3, generator=rng) * 255).byte().numpy()) for _ in range(4)]
    data = Dataset.from_dict({"image": pictures, "question": ["what is this ?"] * 4,
                              "answer": ["cat", "dog", "red", "blue"]})
    DatasetDict({"test": data}).save_to_disk(os.path.join(folder, "data"))
    with open(os.path.join(folder, "tiny_vqa.yaml"), "w") as f:
        f.write(textwrap.dedent(f"""
            task: tiny_vqa
            dataset_path: {os.path.join(folder, "data")}
            dataset_kwargs:
              load_from_disk: true
            test_split: test
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 4
              temperature: 0
              do_sample: false
            process_results: !function utils.process_results
            metric_list:
              - metric: match
                aggregation: mean
                higher_is_better: true
              - metric: words
                aggregation: mean
                higher_is_better: true
            metadata:
              - version: 0.0
        """))
    with open(os.path.join(folder, "utils.py"), "w") as f:
        f.write(textwrap.dedent("""
            def doc_to_visual(doc):
                return [doc["image"].convert("RGB")]

            def doc_to_text(doc, lmms_eval_specific_kwargs=None):
                return doc["question"]

            def process_results(doc, results):
                answer = results[0].strip()
                return {"match": float(answer == doc["answer"]), "words": float(len(answer.split()))}
        """))


def evaluate(root: str, model: str, model_args: str = "", tasks: Sequence[str] = ("tiny_vqa",),
             force_simple: bool = False) -> Dict[str, Any]:
    """lmms-eval's own `simple_evaluate` on the saved model and tasks under `root` (what the CLI
    calls); `device_map=cpu` because lmms-eval 0.7.3's `llava_hf` default `""` is refused by
    transformers 5. Only the tasks under `root` are indexed (lmms-eval's own take seconds a run)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    args = f"pretrained={os.path.join(root, 'model')},device_map=cpu,{model_args}".rstrip(",")
    return simple_evaluate(model=model, model_args=args, tasks=list(tasks), device="cpu", batch_size=1,
                           log_samples=True, force_simple=force_simple,
                           task_manager=TaskManager(include_path=os.path.join(root, "tasks"), include_defaults=False))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lmms-tiny", help="folder for the model and the task (default ./lmms-tiny)")
    parser.add_argument("--model-args", default="method=tome,tokens=16",
                        help="tome_plus's options as lmms-eval's --model_args (default method=tome,tokens=16)")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.out, "tasks"), exist_ok=True)
    save_model(os.path.join(args.out, "model"))
    save_task(os.path.join(args.out, "tasks"))
    scores = {}
    for name, model, model_args in [("unpatched (llava_hf)", "llava_hf", ""),
                                    (f"tome_plus {args.model_args}", "tome_plus", args.model_args)]:
        scores[name] = evaluate(args.out, model, model_args)["results"]["tiny_vqa"]
        numbers = ", ".join(f"{k.split(',')[0]} {v:.3f}" for k, v in scores[name].items() if isinstance(v, float))
        print(f"{name}: {numbers}")
    print("the same from the command line:\n"
          f"  lmms-eval --model tome_plus --model_args pretrained={os.path.join(args.out, 'model')},device_map=cpu,"
          f"{args.model_args} --tasks tiny_vqa --include_path {os.path.join(args.out, 'tasks')} --device cpu "
          "--batch_size 1")
    return scores


if __name__ == "__main__":
    main()
