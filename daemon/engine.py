"""The engine: one model, its persistent recurrent state, the token history, and generation.

Pure computation, no I/O and no clock: the daemon calls it from ONE worker thread (a
single-thread executor), so the event loop never waits on the model. Tokens enter through
`feed` as soon as the online encoder finalises them; `generate` samples a continuation of a
whole number of bars from a copy of the state (grammar-masked, so every completion decodes),
streaming each decoded note through a callback as soon as its last token is drawn. What the
daemon plays comes back through the encoder like the player's notes, so the state always
holds the whole conversation. `swap_model` re-primes a new model from the token history.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.weight_formats import check_format
from model.checkpoint import CheckpointMeta
from model.remi_grammar import DecodedEvent, RemiGrammar, RemiState, RemiStreamDecoder
from model.rwkv7 import RWKV7
from model.sampling import SamplingSettings, sample

log = logging.getLogger(__name__)

# Runs of more tokens than this go through the chunked prefill instead of one step per token.
PREFILL_MIN_TOKENS = 16
# Safety cap: no bar of a completion may take more tokens than this (a runaway sampler).
MAX_TOKENS_PER_BAR = 256


@dataclass
class Completion:
    """A generated continuation, per variation: ids (starting with the forced Bar and TimeSig)
    and decoded events with times in beats from the completion's first bar line."""

    tokens: list[list[int]]
    events: list[list[DecodedEvent]]
    bars: int
    stopped: bool = False  # cut short by should_stop (the player took over)
    seconds: float = 0.0
    first_event_seconds: list[float | None] = field(default_factory=list)


class Engine:
    """Model, state and history of one live conversation."""

    def __init__(self, model: RWKV7, meta: CheckpointMeta, *, history_limit: int = 8192,
                 step_weights: str = "fp32"):
        """`step_weights`: how the CPU step stores the large matrices of this model and of every
        model swapped in ("fp32", "bf16", "int8"; kernels/weight_formats.py)."""
        self.step_weights = check_format(step_weights)
        model.step_weights = step_weights
        self.model, self.meta = model.eval(), meta
        self.tokenizer = meta.tokenizer()
        if len(self.tokenizer) != model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens, the model {model.cfg.vocab_size}")
        self.grammar = RemiGrammar(self.tokenizer)
        vocab = self.tokenizer.vocab
        self.bos_id, self.bar_id = vocab["BOS_None"], vocab["Bar_None"]
        self.eos_id, self.pad_id = vocab["EOS_None"], vocab["PAD_None"]
        self.history: deque[int] = deque(maxlen=history_limit)
        self.reset()

    @property
    def device(self) -> torch.device:
        return self.model.emb.weight.device

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    # ----------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the conversation: zero state, empty history, then BOS."""
        self.state = self.model.init_state(1)
        self.grammar_state: RemiState = self.grammar.start_state()
        self.logits: torch.Tensor | None = None
        self.timesig_id: int | None = None
        self.history.clear()
        self.feed([self.bos_id])

    def feed(self, ids: list[int]) -> None:
        """Advance the state through final tokens (from the online encoder)."""
        if not ids:
            return
        for token in ids:
            nxt = self.grammar.next_state(self.grammar_state, token)
            if nxt is None:
                log.warning("token %s does not follow the stream's grammar; fed anyway",
                            self.tokenizer[token] if token < len(self.tokenizer) else token)
            else:
                self.grammar_state = nxt
            if self.grammar.layout.kinds[token].name == "TIMESIG":
                self.timesig_id = token
        self.history.extend(ids)
        idx = torch.tensor(ids, device=self.device)
        if len(ids) >= PREFILL_MIN_TOKENS:
            self.logits, self.state = self.model.prefill(idx[None], self.state)
        else:
            with self.model.weights_fixed():
                for token in idx:
                    self.logits, _ = self.model.step(token[None], self.state)

    def swap_model(self, model: RWKV7, meta: CheckpointMeta) -> None:
        """Take a new model and rebuild its state from the token history (same vocabulary)."""
        history = list(self.history)
        model.step_weights = self.step_weights
        self.model, self.meta = model.eval(), meta
        self.state = model.init_state(1)
        self.logits = None
        if history:
            self.logits, self.state = model.prefill(torch.tensor(history, device=self.device)[None], self.state)

    # ----------------------------------------------------------------------------- generation

    def generate(self, bars: int, settings: SamplingSettings, *, seed: int = -1, variations: int = 1,
                 on_event: Callable[[int, DecodedEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Completion:
        """Sample `bars` bars after the current state, `variations` at once as one batch.

        The completion starts at a bar line: a Bar and the current TimeSig are forced, then
        tokens are drawn under the grammar mask until each variation opens bar `bars + 1` (that
        Bar is not part of it) or ends. The engine's own state is not changed.
        on_event(variation, event) receives notes/tempo/pedal events as they complete.
        """
        t0 = time.perf_counter()
        generator = torch.Generator(device=self.device)
        if seed >= 0:
            generator.manual_seed(seed)
        else:
            generator.seed()
        K = variations
        state = self.state.repeat(K) if K > 1 else self.state.clone()
        forced = [self.bar_id] + ([self.timesig_id] if self.timesig_id is not None else [])
        grammar_states = [self.grammar.start_state()] * K
        decoders = [RemiStreamDecoder(layout=self.grammar.layout) for _ in range(K)]
        tokens: list[list[int]] = [[] for _ in range(K)]
        events: list[list[DecodedEvent]] = [[] for _ in range(K)]
        first_event: list[float | None] = [None] * K
        bars_open = [0] * K
        done = [False] * K
        stopped = False

        def accept(i: int, token: int) -> None:
            grammar_states[i] = self.grammar.next_state(grammar_states[i], token) or grammar_states[i]
            if token == self.bar_id:
                bars_open[i] += 1
                if bars_open[i] > bars:
                    done[i] = True
                    return
            if token == self.eos_id:
                done[i] = True
                return
            tokens[i].append(token)
            for event in decoders[i].push(token):
                events[i].append(event)
                if first_event[i] is None:
                    first_event[i] = time.perf_counter() - t0
                if on_event is not None:
                    on_event(i, event)

        # The forced Bar is the completion's time zero for its grammar and decoder.
        with self.model.weights_fixed():  # nothing changes the weights while an answer is sampled
            for token in forced:
                for i in range(K):
                    accept(i, token)
                logits, _ = self.model.step(torch.full((K,), token, device=self.device), state)
            budget = MAX_TOKENS_PER_BAR * bars
            while not all(done) and budget > 0:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                allowed = self.grammar.masks(grammar_states).to(self.device)
                drawn = sample(logits, settings, allowed, generator)
                for i, token in enumerate(drawn.tolist()):
                    if not done[i]:
                        accept(i, token)
                drawn = torch.where(torch.tensor(done, device=self.device), self.pad_id, drawn)
                logits, _ = self.model.step(drawn, state)
                budget -= 1
        return Completion(tokens, events, bars, stopped, time.perf_counter() - t0, first_event)
