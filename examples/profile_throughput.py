"""Throughput of a timm ViT, unpatched vs. patched, in one run (same options as `tome-plus bench`).

    python examples/profile_throughput.py --model vit_base_patch16_224 --method tome --r 16
    python examples/profile_throughput.py --model deit_small_patch16_224 --flops 0.6 --json out.json
"""
from tome_plus.tools.bench import main

if __name__ == "__main__":
    main()
