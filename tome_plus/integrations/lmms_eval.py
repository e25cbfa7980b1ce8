"""lmms-eval model `tome_plus`: any HF model lmms-eval already runs, patched by tome_plus.

lmms-eval (the field's VLM evaluation harness) finds this model through its public extension
point, the `lmms_eval.models` entry-point group (tome_plus's `setup.py` declares `manifest`), so
no fork and no environment variable is needed once tome_plus is installed:

    lmms-eval --model tome_plus \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,keep=0.5 --tasks mme ...

`TomePlus` builds the lmms-eval model named by `base` (default `llava_hf`) from every argument
that is not tome_plus's, then patches its HF model: `method`, `site`, and the method's own options
(its config fields: `r`, `keep`, `flops`, `tokens`, `layers`, ...; a list or dict as a Python
literal in quotes, e.g. `layers="[0, 2]"`). Without `method` it is the unpatched base model (the
reference). The patch record and the visual tokens each prompt kept at each stage are logged: to
lmms-eval's logger as a summary after every call, and line by line to `log=PATH` (JSON lines; the
first line the patch record) when given.
"""
from __future__ import annotations

import ast
import json
from typing import Any, Dict, List, Optional

import tome_plus

from ..methods import get_method

INSTALL_HINT = 'pip install -e ".[eval]"'
OWN = ("base", "method", "site", "log")  # TomePlus's own arguments; the method's options are found by name


def require() -> None:
    """Raise a one-line ImportError naming the install command when lmms-eval is missing."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the lmms-eval integration needs lmms-eval ({e}); install it with {INSTALL_HINT}") from None


def manifest():
    """The entry point lmms-eval reads (group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="tome_plus", simple_class_path="tome_plus.integrations.lmms_eval.TomePlus",
                         chat_class_path="tome_plus.integrations.lmms_eval.TomePlusChat")


def _value(v: Any) -> Any:
    """lmms-eval turns numbers and booleans into Python values; lists and dicts arrive as text,
    quoted where they hold commas (the quotes stay)."""
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1]
    if isinstance(v, str) and v[:1] in "[({":
        return ast.literal_eval(v)
    return v


def split_arguments(kwargs: Dict[str, Any], method: Optional[str]) -> Dict[str, Any]:
    """Take the method's options out of `kwargs` (what is left goes to the base model)."""
    if method is None:
        return {}
    names = set(get_method(method).config_class.option_names())
    return {k: _value(kwargs.pop(k)) for k in list(kwargs) if k in names}


def _through(name: str) -> property:
    """A property that reads and writes `name` on the wrapped model (`self.inner`)."""
    def write(self, value) -> None:
        if "inner" in self.__dict__:
            setattr(self.inner, name, value)
    return property(lambda self: getattr(self.inner, name), write)


try:  # the class must be one of lmms-eval's models; without lmms-eval it is never instantiated
    from lmms_eval.api.model import lmms as _Base
except ImportError:
    _Base = object


class TomePlus(_Base):
    """An lmms-eval model: `base` (an lmms-eval model name) with its HF model patched; the simple
    kind (lmms-eval's `--force_simple`), wrapping the base's simple implementation."""

    is_simple = True

    def __init__(self, base: str = "llava_hf", method: Optional[str] = None, site: Optional[str] = None,
                 log: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__()
        from lmms_eval.models import get_model
        options = split_arguments(kwargs, method)
        inner_cls = get_model(base, force_simple=self.is_simple)
        if getattr(inner_cls, "is_simple", True) != self.is_simple:
            kind = "simple" if self.is_simple else "chat"
            raise ValueError(f"lmms-eval model {base!r} has no {kind} implementation; run tome_plus as the other kind "
                             f"(lmms-eval's --force_simple picks the simple one)")
        self.inner = inner_cls(**kwargs)
        self.base, self.method, self.site, self.options, self.log_path = base, method, site, options, log
        self.record = {"tome_plus": tome_plus.__version__, "base": base, "method": method, "site": site,
                       "options": options}
        self.kept: List[Dict[str, Any]] = []
        model = self.inner.model
        if method is not None:
            tome_plus.patch(model, method, site=site, **options)
            parts = tome_plus.backends.base.get_info(model).parts
            self.record["site"] = getattr(parts, "site", site)  # the default the model chose
            model.register_forward_hook(self._after_forward, with_kwargs=True)
        if log is not None and self.rank == 0:  # one writer: rank 0 (every process logs what it ran)
            with open(log, "w") as f:
                f.write(json.dumps(self.record) + "\n")
        from loguru import logger
        logger.info(f"tome_plus: {self.record}")

    # the base model answers everything else (rank, world size, tokenizer, accelerator, ...)
    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # lmms's own attributes, read and written on the base model (lmms.__init__ sets some before
    # `inner` exists: those writes are dropped, the base model has its own)
    rank = _through("rank")
    world_size = _through("world_size")
    task_dict = _through("task_dict")
    cache_hook = _through("cache_hook")

    def _after_forward(self, module, args, kwargs, output):
        """After a forward that saw images (a prefill): record the visual tokens kept; where the
        tower cut the prompt, give the logits back at the caller's positions (a harness slices them
        by the prompt it built)."""
        if kwargs.get("pixel_values") is None and not kwargs.get("mm_encoder_outputs") \
                and kwargs.get("pixel_values_videos") is None:
            return None
        report = tome_plus.inspect(module)
        entry = {"image_tokens": report.image_tokens.tolist() if report.image_tokens is not None else None,
                 "kept": report.llm_kept.T.tolist() if report.llm_kept is not None else None}
        self.kept.append(entry)
        if self.log_path is not None and self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        ids = kwargs.get("input_ids")
        logits = getattr(output, "logits", None)
        if ids is None or logits is None or logits.shape[1] in (ids.shape[1], 1):
            return None
        from ..vlm.calls import cut_call
        fitted = cut_call(module, dict(kwargs), {})
        rows, columns, new = fitted["moved"]
        full = logits.new_zeros(ids.shape[0], ids.shape[1], logits.shape[-1])
        full[rows, columns] = logits[rows, new]
        output.logits = full
        return output

    def summary(self) -> Dict[str, Any]:
        """Mean visual tokens per prompt into the LLM and after each site, over the calls so far."""
        rows = [(i, k) for e in self.kept if e["image_tokens"]
                for i, k in zip(e["image_tokens"], e["kept"] or [[]] * len(e["image_tokens"]))]
        if not rows:
            return {}
        into = sum(i for i, _ in rows) / len(rows)
        sites = [sum(k[s] for _, k in rows) / len(rows) for s in range(len(rows[0][1]))]
        return {"prompts": len(rows), "visual_tokens_in": into, "visual_tokens_kept": sites}

    def _logged(self, result):
        from loguru import logger
        if self.method is not None:
            logger.info(f"tome_plus {self.method}: {self.summary()}")
        return result

    def loglikelihood(self, requests):
        return self._logged(self.inner.loglikelihood(requests))

    def generate_until(self, requests):
        return self._logged(self.inner.generate_until(requests))

    def generate_until_multi_round(self, requests):
        return self._logged(self.inner.generate_until_multi_round(requests))


class TomePlusChat(TomePlus):
    """The chat kind (lmms-eval's default where the base has one), wrapping the base's chat
    implementation."""

    is_simple = False


def evaluate(pretrained: str, tasks: List[str], method: Optional[str], options: Dict[str, Any],
             base: str = "llava_hf", metric: Optional[str] = None, limit: Optional[int] = None,
             include_path: Optional[str] = None, device: str = "cpu", batch_size: int = 1) -> float:
    """One lmms-eval run of `pretrained` (patched with `method` and `options`, site included) on
    `tasks`; returns `metric` of the first task (default: its first metric)."""
    require()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    # device_map: llava_hf's default "" is refused by transformers 5 (the device goes to lmms-eval)
    args = dict(pretrained=pretrained, base=base, device_map=device)
    if method is not None:
        args.update(method=method, **options)
    model_args = ",".join(f"{k}={_arg(v)}" for k, v in args.items())
    results = simple_evaluate(model="tome_plus", model_args=model_args, tasks=tasks, limit=limit,
                              batch_size=batch_size, device=device, log_samples=False,
                              task_manager=TaskManager(include_path=include_path))
    scores = results["results"][tasks[0]]
    if metric is None:
        metric = next(k for k, v in scores.items() if isinstance(v, (int, float)) and "stderr" not in k
                      and k != "alias")
    key = metric if metric in scores else next((k for k in scores if k.split(",")[0] == metric), None)
    if key is None:
        raise ValueError(f"task {tasks[0]} reports {sorted(scores)}, not {metric!r}")
    return float(scores[key])


def _arg(value: Any) -> str:
    """A model argument as lmms-eval's `key=value,...` string takes it (lists and dicts quoted)."""
    return f'"{value!r}"' if isinstance(value, (list, tuple, dict)) else str(value)
