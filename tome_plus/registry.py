"""One way to register what `patch` looks up by name: methods, heads, KV policies and backends.

Each of those packages holds one `Registry` named `REGISTRY`. An entry is the object itself or,
where importing it would load a model library, its import path ("package.module" for a module,
"package.module:attribute" for a name in it), imported on the first `get`. An entry's options are
checked in one place, `Registry.check_options`: an unknown one is a TypeError naming the valid
ones. Core layer: imports nothing from tome_plus.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Generic, Iterator, List, Mapping, NamedTuple, Optional, TypeVar

T = TypeVar("T")


class Entry(NamedTuple):
    name: str
    target: Any  # the registered object, or its import path (a str) until `Registry.get` imports it
    package: Optional[str] = None  # the third-party package the import needs (None: torch alone)


def option_names(config_cls: type) -> List[str]:
    """The options a config dataclass takes: its fields that `__init__` accepts."""
    return [f.name for f in dataclasses.fields(config_cls) if f.init]


def resolve(path: str) -> Any:
    """The object an import path names: "package.module" or "package.module:attribute"."""
    module, _, attribute = path.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


class Registry(Generic[T]):
    """Name -> entry, in registration order (backends are tried in that order).

    Args:
        kind: what the entries are, as messages name them ("method", "KV policy").
        options: how a caller passes an entry's options, as messages name them ("kv_options").
        config: the config dataclass of an entry (`get`'s object); None: entries take no options.
    """

    def __init__(self, kind: str, options: str = "option(s)", config: Optional[Callable[[T], type]] = None) -> None:
        self.kind, self.options, self._config = kind, options, config
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, target: Any = None, *, package: Optional[str] = None) -> Any:
        """Add `target` (an object or an import path) as `name`; without `target`, a decorator."""
        if target is None:
            return lambda obj: self.register(name, obj, package=package)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = Entry(name, target, package)
        return target

    def unregister(self, name: str) -> None:
        """Remove `name` (tests, and plug-ins replacing an entry)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry registered as `name`, imported now if it is an import path."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        target = self._entries[name].target
        return resolve(target) if isinstance(target, str) else target

    def names(self) -> List[str]:
        """The registered names, sorted (nothing is imported)."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check_options(self, name: str, options: Mapping[str, Any]) -> type:
        """The config dataclass of `name`, once every key of `options` is one of its options
        (TypeError naming the valid ones otherwise). Callers build it when they need it."""
        entry = self.get(name)
        if self._config is None:
            raise TypeError(f"a {self.kind} takes no options")
        config_cls = self._config(entry)
        valid = option_names(config_cls)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown {self.options} {unknown} for {self.kind} {name!r}; valid options: {valid}")
        return config_cls

    def config(self, name: str, options: Optional[Mapping[str, Any]] = None) -> Any:
        """`name`'s config dataclass built from `options` (checked by `check_options`)."""
        options = dict(options or {})
        return self.check_options(name, options)(**options)
