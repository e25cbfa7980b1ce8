"""The Reducer contract, the shared config fields and the method registry.

A method is one file: a config dataclass (its options, validated at `patch` time) and a `Reducer`
that turns the signals of one layer into a `Plan`. Methods know nothing of timm or HF; backends
know nothing of any one method.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from ..merging import Plan
from .. import registry
from ..schedule import paper_keep_removal
from ..state import TokenState

RBudget = Union[int, Sequence[int], Tuple[int, float]]
KeepBudget = Union[float, Sequence[float]]

BUDGETS = ("r", "keep", "flops", "tokens")  # give exactly one

SIGNALS = frozenset({"k", "keys", "cls_attn", "attn", "x"})
POSITIONS = ("kept", "packed")  # `ReductionConfig.positions`: where the features site places kept tokens


@dataclass
class ReductionConfig:
    """Options shared by every method. Give exactly one budget.

    Attributes:
        r: tokens removed per layer: an int, a per-layer list, or ToMe's decreasing schedule
            `(r, inflect)` with inflect in [-1, 1] (-1 removes more early, +1 more late).
        keep: fraction of the reducible tokens kept by each layer (a float or a per-layer list).
        flops: target fraction of the unpatched model's FLOPs, solved into per-layer counts for
            the model and input size.
        tokens: reducible (non-prefix) tokens left after the last reducing layer, an int >= 1;
            `T - tokens` of the T reducible input tokens are removed, spread evenly over the layers
            that reduce (`schedule.solve`). In a LLaVA vision tower that is the image tokens per
            image the LLM receives under the "default" feature selection (which drops the class
            token); under "full" the LLM gets the class token too, `tokens + 1`. In-LLM methods
            read it per image: FastV keeps exactly `tokens` visual tokens per image, ATP averages
            `tokens` per image over the LLM's layers.
        prop_attn: proportional attention (add `log(size)` to every key's logit); None takes the
            method's default (its paper's).
        trace_source: record which input patches each token stands for (`tome_plus.inspect`).
        weighted_pool: average pooling weighs each token by its size, so the pooled feature is the
            mean over input patches (the original ToMe code takes a plain mean over tokens; set
            False for that).
        positions: `site="features"` or `"llm"` of a vision-language model only: "kept" (default)
            leaves every kept token at its position, gaps where tokens were reduced; "packed"
            numbers the kept tokens consecutively and every later token after them, as vLLM and
            LLaVA's own code place a shorter image (1-D rotary families; at `site="llm"` after
            each pruning site, as PyramidDrop's code).
    """

    r: Optional[RBudget] = None
    keep: Optional[KeepBudget] = None
    flops: Optional[float] = None
    tokens: Optional[int] = None
    prop_attn: Optional[bool] = None
    trace_source: bool = False
    weighted_pool: bool = True
    positions: str = "kept"

    # The budget used when the caller gives none, and the proportional-attention default; per method.
    default_budget: ClassVar[Dict[str, object]] = {"r": 0}
    default_prop_attn: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.prop_attn is None:
            self.prop_attn = self.default_prop_attn
        given = [name for name in BUDGETS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if not given:
            for name, value in self.default_budget.items():
                setattr(self, name, value)
        self._validate_budget()
        for name in ("prop_attn", "trace_source", "weighted_pool"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(map(repr, POSITIONS))}, got {self.positions!r}")

    def _validate_budget(self) -> None:
        # numbers.Integral / Real accept numpy scalars too; values are stored as Python numbers
        r, keep, flops = self.r, self.keep, self.flops
        if r is not None:
            if isinstance(r, tuple):
                if len(r) != 2 or not is_int(r[0]) or not is_real(r[1]):
                    raise ValueError(f"r as a tuple is ToMe's schedule (r, inflect), got {r!r}")
                if r[0] < 0:
                    raise ValueError(f"r must be >= 0, got {r[0]}")
                if not -1.0 <= r[1] <= 1.0:
                    raise ValueError(f"inflect must lie in [-1, 1], got {r[1]}")
                self.r = (int(r[0]), float(r[1]))
            elif isinstance(r, Sequence) and not isinstance(r, str):
                if len(r) == 0 or not all(is_int(v) for v in r):
                    raise ValueError(f"r as a list must hold ints, got {r!r}")
                if any(v < 0 for v in r):
                    raise ValueError(f"r must be >= 0 in every layer, got {list(r)}")
                self.r = [int(v) for v in r]
            elif is_int(r):
                if r < 0:
                    raise ValueError(f"r must be >= 0, got {r}")
                self.r = int(r)
            else:
                raise ValueError(f"r must be an int, a per-layer list or (r, inflect), got {r!r}")
        if keep is not None:
            is_list = isinstance(keep, (list, tuple))
            values = list(keep) if is_list else [keep]
            if not values:
                raise ValueError("keep as a list needs one fraction per layer, got []")
            for v in values:
                if not is_real(v):
                    raise ValueError(f"keep must be a number in (0, 1] or a list of them, got {v!r}")
                if not 0.0 < v <= 1.0:
                    raise ValueError(f"keep must lie in (0, 1], got {float(v)}")
            self.keep = [float(v) for v in values] if is_list else float(keep)
        if flops is not None:
            if not is_real(flops):
                raise ValueError(f"flops must be a number in (0, 1], got {flops!r}")
            if not 0.0 < flops <= 1.0:
                raise ValueError(f"flops must lie in (0, 1], got {float(flops)}")
            self.flops = float(flops)
        if self.tokens is not None:
            if not is_int(self.tokens) or self.tokens < 1:
                raise ValueError(f"tokens must be an int >= 1 (reducible tokens left), got {self.tokens!r}")
            self.tokens = int(self.tokens)

    @property
    def budget(self) -> Tuple[str, object]:
        for name in BUDGETS:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        raise AssertionError("unreachable: __post_init__ sets a budget")

    @classmethod
    def option_names(cls) -> List[str]:
        return registry.option_names(cls)


def is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class Reducer:
    """One token-reduction method.

    Subclasses set `name`, `config_class`, `needs` and implement `max_remove` and `plan`.
    `needs` names the signals `plan` reads from the layer's attention: "k" (per-head keys
    `[B, H, N, D]` after qk-norm, a free view), "keys" (their head average `[B, N, D]`, one mean),
    "cls_attn" (the class token's attention row `[B, H, N]`, one extra row of logits) and "attn"
    (the probabilities `[B, H, N, N]`: explicit attention in that layer, so ask only where needed)
    and "x" (the hidden state `[B, N, C]` where the method reduces).
    `site` says where a layer reduces: "attn" (between attention and MLP, the ViT papers) or
    "block" (after the whole layer).
    `budget_unit` tells the FLOPs solver which schedule family the method's paper uses:
    "r" (a constant count per layer) or "keep" (a constant fraction per layer).
    """

    name: ClassVar[str]
    config_class: ClassVar[Type[ReductionConfig]] = ReductionConfig
    needs: ClassVar[FrozenSet[str]] = frozenset({"keys"})
    budget_unit: ClassVar[str] = "r"
    merges: ClassVar[bool] = True  # sizes grow (False for pure pruning: sizes stay one)
    # which tokens it reduces: "vision" (a ViT's or vision tower's layers) or "llm" (visual tokens
    # inside a LLaVA language model: a backend answering `LLM_METHODS`)
    target: ClassVar[str] = "vision"
    # where in a vision-language model it may run (`patch(..., site=...)`): "tower" (the vision
    # tower's layers), "features" (each image's features, once, before the language model), "llm"
    vlm_sites: ClassVar[Tuple[str, ...]] = ("tower", "features")
    # reduces once, in the last layer that may (a VLM tower's feature layer)
    last_layer_only: ClassVar[bool] = False
    # selects the image tokens a VLM's language model receives: refused on a ViT or a tower alone
    # (`vlm_only`; a method without a tower site is so anyway)
    for_vlm_only: ClassVar[bool] = False

    def __init__(self, config: ReductionConfig) -> None:
        self.config = config

    @property
    def site(self) -> str:
        """Where a layer reduces: "attn" (between attention and MLP) or "block" (after the MLP)."""
        return "attn"

    def for_family(self, family: str) -> None:
        """Settle options whose paper default depends on the model family ("timm" or "hf"); called
        by the backend at `patch`. Most methods have none."""

    def for_model(self, name: Optional[str], gflops_of) -> None:
        """Settle what depends on the very model: its name (e.g. timm's `deit_small_patch16_224`)
        and `gflops_of(removals)`, its GFLOPs at the default input with those per-layer removals
        (None: unpatched). DiffRate picks its published schedules here."""

    def removals(self, n_tokens: int, n_prefix: int) -> Optional[List[int]]:
        """Per-layer removal counts the method fixes itself (a searched schedule); None: solve
        them from the budget."""
        return None

    def active(self, layer: int) -> bool:
        """Whether the method reduces in `layer` at all (by configuration, not by budget)."""
        return True

    def needs_at(self, layer: int) -> FrozenSet[str]:
        """Signals wanted from the attention of `layer` (methods that prune only in some layers narrow this)."""
        return self.needs

    def check(self, depth: int) -> None:
        """Validate options that depend on the model (e.g. layer lists); raise ValueError."""

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        """The most tokens `layer` can remove from `n_tokens` with `n_prefix` protected."""
        raise NotImplementedError

    def keep_removal(self, t: int, keep: float) -> int:
        """Tokens removed from `t` reducible ones for a `keep` fraction: `t - floor(t keep)`."""
        return paper_keep_removal(t, keep)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        """Decide which of the tokens survive; `n_remove` is exactly how many must go."""
        raise NotImplementedError


@dataclass(eq=False)
class LlmSite:
    """What a pruning site inside the language model hands its method (`LlmReducer.select`): the
    current tokens of every row after decoder layer `layer`, padded to one count N."""

    layer: int  # the decoder layer just run (0-based)
    hidden: torch.Tensor  # [B, N, D] its output
    received: torch.Tensor  # [B, R, N] the attention each token received, per weighting of `query_weights`
    visual: torch.Tensor  # [B, N] bool: the visual tokens
    candidates: torch.Tensor  # [B, N] bool: the visual tokens the method ranks (training: those still kept)
    instruction: torch.Tensor  # [B, N] bool: the text after the image
    valid: torch.Tensor  # [B, N] bool: real tokens (not padding)
    prompt: torch.Tensor  # [B, N] bool: the prompt's real tokens
    spatial: torch.Tensor  # [B, N] float: each visual token's place on its image's grid (ATP's SAP), 0 elsewhere
    images: Optional[torch.Tensor] = None  # [B] images (and videos) each row holds
    n_visual: Optional[torch.Tensor] = None  # [B] visual tokens each row had before the first site
    index: Optional[torch.Tensor] = None  # [B, N] each current token's position in the forward's input
    memo: Optional[torch.Tensor] = None  # [B, N] the method's `forward_memo` at the current tokens
    trainable: Optional[nn.Module] = None  # what `prepare` built (ATP's modules)
    soft: bool = False  # training: a soft mask in (0, 1], nothing removed


@dataclass(eq=False)
class Recycled:
    """`select`'s answer where pruned tokens come back merged (SparseVLM's recycling): the merged
    tokens are written into some pruned slots of `hidden` (which they then stand for: `keep` is
    True there, `merged` marks them) and go after the row's last kept visual token, in `rank` order."""

    keep: torch.Tensor  # [B, N] bool
    hidden: torch.Tensor  # [B, N, D] the site's hidden states, merged tokens written in
    merged: torch.Tensor  # [B, N] bool
    rank: torch.Tensor  # [B, N] long: order among a row's merged tokens


class LlmReducer(Reducer):
    """A method that prunes visual tokens inside the language model of a vision-language model
    (ATP, FastV). One decoder loop (`llm.decoder.PruningDecoder`) runs every such method
    through this contract, with no branch for any one of them:

    - `sites(depth)`: the decoder layers after which it prunes;
    - `prepare(llm, info, per_image)`: at `patch`, what it needs of the language model (trainable
      modules);
    - `query_weights(...)`: in a site's layer the attention each current token receives is summed
      over the queries with these weights (blockwise, beside the model's fused attention: no
      `[B, H, N, N]` map is held);
    - `select(site)`: from that and the hidden states (`LlmSite`), which tokens stay.

    `forward_memo(...)` (optional) runs once per forward that prunes, on the language model's
    input embeddings, before the first layer: `[B, L]`, one value per input token, which every
    site reads at its current tokens (`query_weights(memo=)`, `LlmSite.memo`). `select` may answer a
    `Recycled` (merged tokens placed after the kept visual ones) instead of a mask.

    A method that ranks with the attention the *next* layer would form (PyramidDrop: that
    layer's norm, q and k on the site's hidden states, for its one query) sets
    `scores_next_layer`; its site's own layer then runs fused, untouched.
    """

    scores_next_layer: ClassVar[bool] = False
    # `tokens=N` counts visual tokens kept per image (checked against an image's count); False
    # where it names a setting instead (SparseVLM's 192 / 128 / 64)
    tokens_counted: ClassVar[bool] = True

    needs: ClassVar[FrozenSet[str]] = frozenset({"attn"})
    budget_unit: ClassVar[str] = "keep"
    merges: ClassVar[bool] = False
    target: ClassVar[str] = "llm"
    vlm_sites: ClassVar[Tuple[str, ...]] = ("llm",)

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return 0  # counts are decided per instance at run time: no schedule to solve

    def sites(self, depth: int) -> List[int]:
        """The decoder layers (0-based) after which tokens are pruned, in a model of `depth` layers
        (ValueError where the options name layers it does not have)."""
        raise NotImplementedError

    def prepare(self, llm: nn.Module, info, per_image: Optional[int]) -> Optional[nn.Module]:
        """Called once at `patch` with the language model, the patch record and the image tokens
        one image puts into it (None where images differ: anyres tiles, native resolution): the
        method's trainable part (an `nn.Module` the model carries and `unpatch` removes), or None."""
        return None

    def query_weights(self, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor,
                      prompt: torch.Tensor, memo: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`[B, R, N]`: R weightings of the N current tokens as queries (`LlmSite` names the masks;
        `memo`: the method's `forward_memo` at the current tokens)."""
        raise NotImplementedError

    @property
    def one_query(self) -> bool:
        """Whether `query_weights` weighs one query per instance and weighting (FastV's last row):
        the scoring layer then forms that query's probabilities alone."""
        return False

    def forward_memo(self, embeddings: torch.Tensor, visual: torch.Tensor, instruction: torch.Tensor,
                     valid: torch.Tensor) -> Optional[torch.Tensor]:
        """`[B, N]`, one value per input token, that the method keeps for this forward from its
        input embeddings `[B, N, D]` (SparseVLM: its raters); None: nothing."""
        return None

    def select(self, site: LlmSite) -> torch.Tensor:
        """Keep mask `[B, N]` over the site's tokens: bool, or with `site.soft` a float in (0, 1];
        tokens outside `site.candidates` must be kept (1)."""
        raise NotImplementedError


def received(probs: torch.Tensor, weights: torch.Tensor, current: Optional[int] = None) -> torch.Tensor:
    """`[B, R, N]`: the attention each of the N current tokens receives, averaged over heads and
    summed over the Q queries with `weights` (`[B, R, Q]`), from the probabilities `[B, H, Q, P + N]`
    (P cached keys, not scored). `current`: N, where the queries are a block of the current tokens
    (the decoder's blockwise sums); by default Q = N."""
    n = weights.shape[-1] if current is None else current
    return torch.einsum("brq,bqk->brk", weights.float(), probs[..., -n:].float().mean(dim=1))


# every method, registered by `@register` on its Reducer (one line next to the class)
REGISTRY: registry.Registry[Type[Reducer]] = registry.Registry("method", config=lambda reducer: reducer.config_class)


def vlm_only(method: Type[Reducer]) -> bool:
    """Whether a vision method selects only the image tokens a VLM's language model receives
    (DivPrune on the features, VisionZip): a ViT, or a vision tower alone, has no place for it."""
    return method.target != "llm" and ("tower" not in method.vlm_sites or method.for_vlm_only)


def vlm_places(method: Type[Reducer]) -> str:
    """Where a VLM-only method runs, as messages name it."""
    where = "site='features', after the projector"
    return where + (", or the tower's feature layer" if "tower" in method.vlm_sites else "")


def register(cls: Type[Reducer]) -> Type[Reducer]:
    """Class decorator: make a reducer available to `tome_plus.patch` under `cls.name`."""
    return REGISTRY.register(cls.name, cls)


get_method = REGISTRY.get
method_names = REGISTRY.names
