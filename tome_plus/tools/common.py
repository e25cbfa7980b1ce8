"""CLI plumbing the command-line tools share: method/budget arguments, checks, errors, outputs.

Exit status of every tool: 0 on success; 2 when the command line is refused before any work
(argparse's own errors and the tools' checks of option values: ranges, budget values and syntax,
method names and options, a device this machine lacks, an input path that does not exist, an
output path that cannot be written or that holds a checkpoint the run would replace, `--resume`
with nothing to resume or with other settings than the checkpoint's); 1 when the work fails
(unreadable or corrupt input files, data that does not fit the model, a model tome_plus cannot
patch, a budget the model cannot take); 130 when Ctrl-C stops it. Either way one line goes to
stderr: `tome-plus <cmd>: error: ...`, or `tome-plus <cmd>: interrupted: ...` (where it stopped,
what was written, how to go on); `TOME_PLUS_DEBUG=1` shows the traceback of a failure instead.
Warnings during a tool's run are one line too, `tome-plus <cmd>: warning: ...` (the library's
own warnings stay Python warnings for library users).

An option that the chosen mode of a tool does not read (`bench --kv-option` without `--kv`) is
refused, not ignored (`refuse_unread`): options that only some modes read default to None, and the
tool fills in their documented defaults once it knows its mode (`fill_defaults`).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, NoReturn, Optional, Sequence

import torch

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# What a tool reports as one line: errors about files, data, models and budgets. Anything else
# (AttributeError, KeyError, ...) is a bug in tome_plus and keeps its traceback.
RUNTIME_ERRORS = (OSError, ValueError, TypeError, RuntimeError, ImportError)


class UsageError(Exception):
    """A command-line value refused before any work (exit status 2, as argparse's own errors)."""


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line like every other tool error (no usage block)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message, EXIT_USAGE)


def one_line(message: Any) -> str:
    """A message as one line: its non-empty lines joined by "; "."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(prog: str, message: Any, status: int) -> NoReturn:
    """Print `prog: error: message` on one line to stderr and exit with `status`."""
    print(f"{prog}: error: {one_line(message) or type(message).__name__}", file=sys.stderr)
    raise SystemExit(status)


def is_rank0() -> bool:
    """Whether this process is rank 0 of a torchrun job (or runs alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def interrupted(prog: str, message: str) -> NoReturn:
    """Ctrl-C: one line `prog: interrupted: message` (rank 0 only under torchrun), exit status 130."""
    if is_rank0():
        print(f"{prog}: interrupted: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def torchvision_mismatch(error: BaseException) -> Optional[str]:
    """The one line for a torchvision whose compiled operators do not load (built for another
    torch: `operator torchvision::nms does not exist`), with the fix; None for any other error."""
    if not isinstance(error, RuntimeError) or "torchvision::" not in str(error):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version, vision_version = version("torch"), version("torchvision")
    except PackageNotFoundError:
        torch_version, vision_version = torch.__version__, "?"
    release = torch_version.split("+")[0]
    major, minor, *rest = release.split(".")
    # torchvision 0.(M+15).P is the release built for torch 2.M.P
    pair = (f"pip install torch=={release} torchvision==0.{int(minor) + 15}.{rest[0] if rest else 0}"
            if major == "2" and minor.isdigit() else "pip install torch torchvision (the same release of both)")
    return (f"torchvision {vision_version} does not match torch {torch_version}: its compiled operators do not load "
            f"({one_line(error)}); install a matching pair, e.g. {pair}")


@contextmanager
def startup_errors(prog: str) -> Iterator[None]:
    """What can go wrong around a tool's own `cli_errors` (importing it, reading its command line) as
    one line: Ctrl-C (exit status 130) and a torchvision that does not match torch (1)."""
    try:
        yield
    except KeyboardInterrupt:
        interrupted(prog, "stopped before it finished")
    except RuntimeError as e:
        message = torchvision_mismatch(e)
        if message is None:  # any other RuntimeError here is a bug: keep its traceback
            raise
        fail(prog, message, EXIT_FAILURE)


@contextmanager
def cli_warnings(prog: str) -> Iterator[None]:
    """Warnings raised while a tool runs print as one line `prog: warning: ...` (not Python's
    two-line format, which would point at the console-script shim); the filters stay as they are."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        try:
            print(f"{prog}: warning: {one_line(message)}", file=file or sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed stderr: as Python's own showwarning, say nothing
            pass

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextmanager
def cli_errors(prog: str, on_interrupt: Optional[Callable[[], str]] = None) -> Iterator[None]:
    """Turn the errors a user can cause into one line and an exit status (see the module doc).

    `on_interrupt()` says, on Ctrl-C, where the work stopped, what was written and how to go on
    (without it the line says only that the tool stopped)."""
    try:
        with cli_warnings(prog):
            yield
    except UsageError as e:
        fail(prog, e, EXIT_USAGE)
    except KeyboardInterrupt:
        message = "stopped before it finished"
        if on_interrupt is not None:
            try:
                message = on_interrupt()
            except Exception as e:  # the report must not turn Ctrl-C into a traceback
                message = f"stopped ({type(e).__name__} while reporting where)"
        interrupted(prog, message)
    except RUNTIME_ERRORS as e:
        if os.environ.get("TOME_PLUS_DEBUG") == "1":
            raise
        fail(prog, torchvision_mismatch(e) or e, EXIT_FAILURE)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def check_device(text: str) -> str:
    """An argparse `type`: a torch device this machine has (a missing GPU fails here, not mid-run)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available to torch here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: only {count} CUDA device(s) here")
    return text


def check_method(name: Optional[str], vision_model: Optional[str] = None) -> None:
    """An unknown method is a usage error, before any model is built; so is a method that prunes
    inside a language model (atp, fastv) where the tool patches `vision_model` (what it is, e.g.
    "a timm model"), which has none."""
    from ..methods import get_method
    from ..methods.base import vlm_only, vlm_places

    if name is None:
        return
    try:
        method = get_method(name)
    except ValueError as e:
        raise UsageError(f"--method: {e}") from None
    if vision_model is not None and method.target == "llm":
        raise UsageError(f"method {name!r} prunes visual tokens inside the language model of a vision-language "
                         f"model; {vision_model} has none")
    if vision_model is not None and vlm_only(method):
        raise UsageError(f"method {name!r} selects the image tokens a vision-language model's language model "
                         f"receives, once ({vlm_places(method)}); {vision_model} has no such place")


def given(value: Any) -> bool:
    """Whether an option was on the command line, for the options some modes do not read: they
    default to None (flags to False, repeatable options to []); `--no-X` of a `--X/--no-X` pair,
    False, counts as not given (it asks for what those modes do anyway)."""
    return value is not None and value is not False and value != []


def refuse_unread(args: argparse.Namespace, mode: str, read_by: Dict[str, Sequence[str]],
                  dests: Optional[Dict[str, str]] = None) -> None:
    """Refuse (usage error) each option given that `mode` does not read, rather than ignore it:
    `read_by` maps an option to the modes that read it (its argparse dest: the option without its
    dashes, `-` as `_`, unless `dests` names another)."""
    for option, modes in read_by.items():
        dest = (dests or {}).get(option, option.lstrip("-").replace("-", "_"))
        if mode not in modes and given(getattr(args, dest, None)):
            readers = ", ".join(modes[:-1]) + " or " + modes[-1] if len(modes) > 1 else modes[0]
            raise UsageError(f"{option} is read only with {readers}, not with {mode}")


FASHION = "--data fashion-mnist"


def data_mode(data: str) -> str:
    """The mode a tool's `--data` picks, as `refuse_unread` names it."""
    return FASHION if data == "fashion-mnist" else "an ImageFolder --data"


def fill_defaults(args: argparse.Namespace, defaults: Dict[str, Any]) -> None:
    """Give each option left None its documented default (once `refuse_unread` has seen what was given)."""
    for dest, value in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def check_options(method: str, options: Dict[str, Any]) -> None:
    """The method's options (budget included) as `tome_plus.patch` will check them, now, before any
    model is built: a bad value (`--r -1`, `--keep 2`, `--budget r=abc`) or an unknown option is a
    usage error. A `schedule` file that is missing is a usage error too; one that cannot be read
    as a schedule is a failure naming the file."""
    from ..methods import REGISTRY

    check_method(method)
    try:
        config_cls = REGISTRY.check_options(method, options)
    except TypeError as e:
        raise UsageError(str(e)) from None
    schedule = options.get("schedule")
    if isinstance(schedule, str):  # DiffRate's searched schedule: a file that must be there and hold one
        loaded = read_schedule_file(schedule, f"schedule={schedule!r}",
                                    "a JSON object with prune_kept_num and merge_kept_num")
        options = {**options, "schedule": loaded}
        try:
            config_cls(**options)
        except ValueError as e:
            if "kept_num" in str(e):  # what the file holds is at fault
                raise ValueError(f"schedule={schedule!r}: {one_line(e)}") from None
            raise UsageError(one_line(e)) from None
        return
    try:
        config_cls(**options)
    except (ValueError, TypeError) as e:
        raise UsageError(one_line(e)) from None


def read_schedule_file(path: str, named: str, expected: str) -> Dict[str, Any]:
    """A DiffRate schedule file named on the command line (`named`: how the messages name it): a
    usage error when it is not there, a failure when it is not JSON or not an object (`expected`)."""
    if not os.path.isfile(path):
        raise UsageError(f"{named}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{named} could not be read as JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{named} is not {expected}")
    return loaded


def check_input(path: Optional[str], option: str, folder: bool = False) -> None:
    """An input path named on the command line must exist (a usage error otherwise, before any work)."""
    if path is None:
        return
    if folder and not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is not a folder" + ("" if os.path.exists(path) else " (no such path)"))
    if not folder and not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} is not a file" + ("" if os.path.exists(path) else " (no such path)"))


def check_checkpoint_out(path: str, resume: bool, overwrite: bool) -> None:
    """A trainer's `--out`: refuse to replace a checkpoint unless `--overwrite`, and refuse
    `--resume` when there is nothing to resume (usage errors, before any work; rank 0 checks)."""
    if resume and overwrite:
        raise UsageError("--resume continues --out, --overwrite replaces it: give one")
    if not is_rank0():
        return
    exists = os.path.exists(path)
    if resume and not exists:
        raise UsageError(f"--resume: there is no checkpoint at --out {path!r} to continue; "
                         "leave out --resume to start a new run")
    if exists and not resume and not overwrite:
        raise UsageError(f"--out {path!r} already exists; pass --resume to continue it or --overwrite to "
                         "replace it")


def prepare_output(path: Optional[str], option: str) -> None:
    """Create the folder of an output file now, so a long run cannot fail at its end for want of
    it; refuse (usage error) a path that cannot be written."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot create folder {target.parent} ({e.strerror})") from None
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


def prepare_folder(path: str, option: str) -> None:
    """Create an output folder now; refuse (usage error) one that cannot be: a file in the way, no
    permission."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{option} {path}: is a file; give a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: not writable")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_method_args(parser: argparse.ArgumentParser, default_method: Optional[str] = "tome",
                    unset: bool = False) -> None:
    """The method and budget options. `unset`: `--method` stays None unless given (a tool with modes
    that do not read it fills in `default_method` once it knows its mode)."""
    g = parser.add_argument_group("token reduction (as tome_plus.patch)")
    g.add_argument("--method", default=None if unset else default_method,
                   help="registered method (see tome_plus.methods())"
                        + (f"; default {default_method}" if default_method else ""))
    g.add_argument("--r", type=_literal, default=None,
                   help="tokens removed per layer: 16, a list [16,8,...] or ToMe's (r, inflect) e.g. '(16,-1)'")
    g.add_argument("--keep", type=_literal, default=None, help="fraction of tokens kept per layer, e.g. 0.9")
    g.add_argument("--flops", type=float, default=None, help="target fraction of the unpatched FLOPs, e.g. 0.5")
    g.add_argument("--tokens", type=int, default=None,
                   help="reducible tokens left after the last reducing layer (LLaVA: image tokens per image), e.g. 64")
    g.add_argument("--budget", default=None, metavar="KIND=VALUE",
                   help="the budget as one argument, e.g. r=16, keep=0.9, flops=0.5, tokens=64, 'r=(16,-1)'. "
                        "Use this form under torchrun, whose own --rdzv-*/--role options make --r ambiguous")
    g.add_argument("--prop-attn", dest="prop_attn", action=argparse.BooleanOptionalAction, default=None,
                   help="proportional attention (default: the method's)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, value as a Python literal (repeatable)")


def method_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The `tome_plus.patch` keyword options given on the command line, checked against
    `args.method`'s config when there is one (see `check_options`)."""
    options: Dict[str, Any] = {}
    for name in ("r", "keep", "flops", "tokens", "prop_attn"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if args.budget:
        if "=" not in args.budget:
            raise UsageError(f"--budget takes KIND=VALUE, got {args.budget!r}")
        kind, value = next(iter(parse_options([args.budget]).items()))
        if kind not in ("r", "keep", "flops", "tokens"):
            raise UsageError(f"--budget kind must be r, keep, flops or tokens, got {kind!r}")
        if kind in options:
            raise UsageError(f"--budget {kind}=... and --{kind}: give the budget once")
        options[kind] = value
    options.update(parse_options(args.option))
    if getattr(args, "method", None):
        check_options(args.method, options)
    return options


def parse_options(items, option: str = "--option") -> Dict[str, Any]:
    """`["KEY=VALUE", ...]` (given as `option`) -> dict, each value a Python literal where it parses as one."""
    options: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{option} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = _literal(value.strip())
    return options

