"""ImageNet (any ImageFolder) evaluation of a patched timm model; same options as `tome-plus eval`.

    python examples/eval_imagenet.py --model deit_small_patch16_224 --pretrained --data /data/imagenet/val \
        --method tome --r 13
    torchrun --nproc_per_node=8 examples/eval_imagenet.py --model ... --data ... --json result.json
"""
from tome_plus.tools.eval import main

if __name__ == "__main__":
    main()
