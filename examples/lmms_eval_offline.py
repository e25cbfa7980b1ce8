"""lmms-eval on a patched VLM with nothing from a hub: a tiny random LLaVA saved with its
processor, a local four-image task, and the harness run unpatched and through tome_plus.

    pip install -e ".[eval]"
    python examples/lmms_eval_offline.py --out /tmp/lmms-tiny

It writes `model/` (a LLaVA checkpoint with a word-level tokenizer) and `tasks/` (the task
`tiny_vqa`: its YAML, its `utils.py` and the images as a `datasets` folder) under `--out`, scores
lmms-eval's own `llava_hf` and the `tome_plus` model at `--model-args`, and prints the CLI line
that does the same, for a real checkpoint and task in place of the tiny ones. Random weights: the
scores show that the harness runs, not what the method is worth.
"""
from __future__ import annotations

import argparse
import os
import textwrap
from typing import Any, Dict, Optional, Sequence

import torch

IMAGE_ID = 199  # the placeholder token; the word-level vocabulary below stays under it
WORDS = ["USER:", "ASSISTANT:", "what", "is", "this", "a", "cat", "dog", "red", "blue", "yes", "no", "?"]
# content as a string (lmms-eval's simple models) or as items (its chat models)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


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


def save_model(path: str, model=None) -> None:
    """`model` (default `tiny_llava()`, 64 px images) with a word-level tokenizer and a CLIP image
    processor, as `from_pretrained` reads them."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_ID}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TEMPLATE, image_token="<image>")
    model = tiny_llava() if model is None else model
    model.generation_config.suppress_tokens = [IMAGE_ID]  # a random model would otherwise emit placeholders
    model.save_pretrained(path)
    processor.save_pretrained(path)


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
    transformers 5."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    args = f"pretrained={os.path.join(root, 'model')},device_map=cpu,{model_args}".rstrip(",")
    return simple_evaluate(model=model, model_args=args, tasks=list(tasks), device="cpu", batch_size=1,
                           log_samples=True, force_simple=force_simple,
                           task_manager=TaskManager(include_path=os.path.join(root, "tasks")))


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
