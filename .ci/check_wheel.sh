#!/usr/bin/env bash
# Build the wheel a user gets from `pip install .`, install it alone into an empty folder and use it
# from outside the source tree: an editable install hides packages or data files the wheel lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# from a copy of the files git tracks (or would): a stale build/ folder would fill the wheel's gaps
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tmp/src"
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src"
python -m pip install --quiet --no-deps --target "$tmp/site" "$tmp"/dist/tome_plus-*.whl
cd "$tmp"
# -S: no site.py, so no .pth file runs: the editable install of this checkout (a meta-path finder
# set up by a .pth) cannot hand out modules the wheel lacks. The dependencies come from site-packages.
deps=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export PYTHONPATH="$tmp/site:$deps"
python -S - "$tmp/site" <<'PY'
import os, sys
import timm, torch
import tome_plus
from tome_plus import heads, tools
from tome_plus.tools import cli

site = sys.argv[1]
assert tome_plus.__file__.startswith(site), f"imported {tome_plus.__file__}, not the wheel in {site}"
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, num_classes=10).eval()
x = torch.randn(2, 3, 224, 224)
for method, options in [("tome", {"r": 8}), ("pitome", {"keep": 0.9}), ("zero_tprune", {"flops": 0.7})]:
    tome_plus.patch(model, method, **options)
    assert model(x).shape == (2, 10), method
tome_plus.patch(model, "tome", r=8, head="clca")
assert model(x).shape == (2, 10)
tome_plus.unpatch(model)
# the shipped DiffRate schedules (package data)
deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
tome_plus.patch(deit, "diffrate", gflops=2.9)
assert deit(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
print("wheel ok:", sorted(tome_plus.methods()), "from", os.path.dirname(tome_plus.__file__))
PY
python -S -m tome_plus.tools.cli --help >/dev/null
grep -q '^tome-plus *= *tome_plus.tools.cli:main' "$tmp"/site/tome_plus-*.dist-info/entry_points.txt
echo "wheel ok: tome-plus command"
