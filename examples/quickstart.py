"""One-line patch of a timm ViT, then a look at what happened inside."""
import timm
import torch

import tome_plus

model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()  # pretrained=True with a hub
images = torch.randn(2, 3, 224, 224)

tome_plus.patch(model, "tome", r=13, trace_source=True)
with torch.no_grad():
    logits = model(images)
info = tome_plus.inspect(model)
print("logits", tuple(logits.shape))
print("tokens after each block:", info.tokens)
print("largest merged group:", int(info.size.max()), "patches")

tome_plus.unpatch(model)  # back to the original classes
