"""LLaVA with a reduced vision tower: the processor's prompt, `generate`, fewer image tokens.

With a hub: `python examples/llava.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg`.
Without one (the default), a tiny random LLaVA built here shows the same calls.
"""
import argparse

import torch

import tome_plus


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=200, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=199)
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF LLaVA checkpoint (needs hub access); default: a tiny random one")
    parser.add_argument("--image", help="an image file (with --model)")
    parser.add_argument("--prompt", default="USER: <image>\nWhat is in the picture? ASSISTANT:")
    parser.add_argument("--method", default="tome")
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()

    if args.model:
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float16).eval()
        processor = AutoProcessor.from_pretrained(args.model)
        inputs = processor(images=Image.open(args.image), text=args.prompt, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        decode = lambda ids: processor.batch_decode(ids, skip_special_tokens=True)
    else:
        model = tiny_llava()
        # what a processor returns: 64 <image> placeholders (8 x 8 patches) inside the text
        ids = torch.tensor([[1, 10, 11] + [199] * 64 + [12, 13]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 64, 64)}
        decode = lambda ids: ids.tolist()

    tome_plus.patch(model, args.method, r=args.r)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    info = tome_plus.inspect(model)
    print("answer:", decode(out[:, inputs["input_ids"].shape[1]:]))
    print("image placeholders in the prompt:", int((inputs["input_ids"] == model.config.image_token_id).sum()))
    print("image tokens the language model received:", info.image_tokens.tolist())
    print("tower tokens after each layer:", info.tokens)
    tome_plus.unpatch(model)


if __name__ == "__main__":
    main()
