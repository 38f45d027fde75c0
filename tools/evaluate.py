"""`rwkv-music eval CKPT DATA_DIR`: how well a checkpoint predicts and continues held-out music.

Likelihood: NLL per token and per note (nats) of the model on a split of prepared shards, beside
an n-gram baseline over the same tokens fitted on the train split. Pieces are scored whole, from
BOS, with the recurrent state carried through windows, as the daemon hears them.

Generation: (context, continuation) pairs cut at bar lines from the split's pieces, one pair per
piece: up to --context-bars bars of context, then the real next --bars bars. Each system
continues the context by the same number of bars and its notes are compared with the real ones:

  pitch-class overlap   overlap of the normalised pitch-class histograms (1 = same shape)
  onset overlap         the same for onset positions in the bar, on a sixteenth-note grid
  density ratio         generated notes per bar / real notes per bar
  in-key share          share of the notes in the scale of the context's key (Krumhansl-Schmuckler)

and its texture is set beside the real continuation's (does it keep the player's texture?):

  notes/bar             notes per bar
  chord share           share of onsets where two or more notes start together
  polyphony             mean number of notes sounding at once, where anything sounds
  pitch range           semitones from the lowest to the highest note
  pc entropy            entropy of the pitch-class histogram, bits

Systems: the model (daemon.engine.Engine: BOS + context, then generate), optionally a second
checkpoint (--baseline, e.g. the chorale model), the context's last bar repeated, and the
n-gram sampled under the same REMI grammar mask with the same sampling settings. A reference
row gives the real continuation's own in-key share and texture. Every passage is decoded by the
same streaming decoder (model.remi_grammar.RemiStreamDecoder). Figures are medians and means
over pairs, the means with a 95% confidence interval (1.96 standard errors).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tools.generation_metrics import (
    BarNote,
    Key,
    Summary,
    chord_share,
    density_ratio,
    estimate_key,
    histogram_overlap,
    in_key_share,
    mean_polyphony,
    notes_per_bar,
    onset_histogram,
    pitch_class_entropy,
    pitch_class_histogram,
    pitch_range,
)

log = logging.getLogger(__name__)

EPILOG = """examples:
  rwkv-music eval checkpoints/default.safetensors data/prepared-default
  rwkv-music eval checkpoints/default.safetensors data/prepared-default --pairs 400 --bars 2 --json
  rwkv-music eval runs/mine/best.safetensors data/prepared --split val --max-tokens 100000 --pairs 0
  rwkv-music eval checkpoints/default.safetensors data/prepared-piano --baseline checkpoints/chorale.safetensors
"""

# Figures per system, in table order: (key, column heading, digits). Agreement with the real
# continuation first, then texture, which the real continuation's row has too.
AGREEMENT: tuple[tuple[str, str, int], ...] = (
    ("pitch_class_overlap", "pitch-class overlap", 3),
    ("onset_overlap", "onset overlap", 3),
    ("density_ratio", "density ratio", 2),
    ("in_key_share", "in-key share", 3),
)
TEXTURE: tuple[tuple[str, str, int], ...] = (
    ("notes_per_bar", "notes/bar", 2),
    ("chord_share", "chord share", 3),
    ("polyphony", "polyphony", 2),
    ("pitch_range", "pitch range", 1),
    ("pc_entropy", "pc entropy", 2),
)
FIGURES = AGREEMENT + TEXTURE


@dataclass
class NllResult:
    name: str
    nll_per_token: float
    nll_per_note: float
    tokens: int
    notes: int
    seconds: float


@dataclass
class Pair:
    """A held-out (context, continuation) pair cut at a bar line of one piece.

    context: int64 [n] the context bars (tempo re-stated at its head when it starts mid-piece),
    without BOS; continuation: int64 [m] the real next bars; last_bar: int64 [k] the context's
    last bar. Each passage starts with a Bar token.
    """

    piece: int
    cut_bar: int  # index in the piece of the continuation's first bar
    context_bars: int
    context: np.ndarray
    continuation: np.ndarray
    last_bar: np.ndarray


@dataclass
class PairFigures:
    """The figures of one system on one pair (NaN where a figure is undefined for it)."""

    pitch_class_overlap: float = math.nan
    onset_overlap: float = math.nan
    density_ratio: float = math.nan
    in_key_share: float = math.nan
    notes_per_bar: float = math.nan
    chord_share: float = math.nan
    polyphony: float = math.nan
    pitch_range: float = math.nan
    pc_entropy: float = math.nan


@dataclass
class GenerationResult:
    name: str
    figures: dict[str, Summary]
    seconds: float = 0.0
    per_pair: list[PairFigures] = field(default_factory=list, repr=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="NLL and generation figures of a checkpoint beside two baselines",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("data", type=Path, help="a prepared directory (rwkv-music prepare)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="held-out split (default test)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens' pieces (0 = all)")
    p.add_argument("--ngram-order", type=int, default=0,
                   help="n-gram order; 0 = pick the best of 2..6 on the val split (default)")
    p.add_argument("--pairs", type=int, default=200,
                   help="(context, continuation) pairs, one per piece at most; 0 = no generation (default 200)")
    p.add_argument("--bars", type=int, default=4, help="bars to continue (default 4)")
    p.add_argument("--context-bars", type=int, default=8, help="bars of context at most (default 8)")
    p.add_argument("--seed", type=int, default=0, help="chooses the pairs and seeds the sampling (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass, 1 = off (default 0.95, as the daemon)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--baseline", type=Path, metavar="CKPT",
                   help="a second checkpoint (same tokenizer) scored and continued beside the first")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_eval)


# --------------------------------------------------------------------------------- likelihood


def checked_split(data: Path, split: str, checkpoint: Path, meta):
    """The `split` of prepared directory `data` (TokenShards), refused with a one-line UserError
    when it is empty or was prepared with another vocabulary than `checkpoint` (meta)."""
    from tools.cli import UserError
    from train.shards import TokenShards

    shards = TokenShards(data, split, expected_vocab_hash=None)
    if shards.vocab_hash != meta.vocab_hash:
        raise UserError(f"{data} was prepared with another vocabulary than {checkpoint}")
    if len(shards) == 0:
        raise UserError(f"the {split} split of {data} is empty")
    return shards


def pieces_of(shards, max_tokens: int, bos_id: int) -> list[np.ndarray]:
    """The split's pieces as BOS-prefixed int64 id arrays, stopping after max_tokens (0 = all)."""
    out, total = [], 0
    for i in range(len(shards)):
        piece = np.concatenate([[bos_id], shards.piece(i).astype(np.int64)])
        out.append(piece)
        total += len(piece) - 1
        if max_tokens and total >= max_tokens:
            break
    return out


# Pieces scored together in one batch: the matmuls of a batch cost little more than one
# piece's on the CPU, and the WKV operator's per-chunk overhead is shared.
NLL_BATCH = 8


def token_nlls(model, pieces: Sequence[np.ndarray], window: int = 1024) -> list[np.ndarray]:
    """NLL (nats) of every token after BOS of each BOS-prefixed piece: float64 [len(piece) - 1]
    per piece, from the model's initial state, the recurrent state carried through windows.

    Pieces of similar length are batched (padded at the end, where padding cannot change the
    earlier tokens' predictions)."""
    import torch
    import torch.nn.functional as F

    out: list[np.ndarray] = [np.empty(0)] * len(pieces)
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
    with torch.no_grad():
        for first in range(0, len(order), NLL_BATCH):
            group = order[first: first + NLL_BATCH]
            longest = max(len(pieces[i]) for i in group)
            ids = torch.zeros(len(group), longest + 1, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(pieces[i])] = torch.as_tensor(pieces[i], dtype=torch.long)
            nll = torch.empty(len(group), longest - 1, dtype=torch.float64)
            state = model.init_state(len(group))
            for start in range(0, longest - 1, window):
                end = min(start + window, longest - 1)
                h, state = model.features(ids[:, start:end], state)
                logits = model.head(h).float()  # [B, T, V]
                nll[:, start:end] = F.cross_entropy(logits.transpose(1, 2), ids[:, start + 1: end + 1],
                                                    reduction="none").double()
            for row, i in enumerate(group):
                out[i] = nll[row, : len(pieces[i]) - 1].numpy()
    return out


def model_nll(model, pieces: Sequence[np.ndarray], window: int = 1024) -> tuple[float, int]:
    """Summed NLL (nats) of every token after BOS, and the count, state carried per piece."""
    nlls = token_nlls(model, pieces, window)
    return float(sum(n.sum() for n in nlls)), sum(len(n) for n in nlls)


def fit_ngram(train_shards, vocab_size: int, order: int, bos_id: int):
    from tools.ngram import NGramModel

    return NGramModel(order, vocab_size).fit(pieces_of(train_shards, 0, bos_id))


# --------------------------------------------------------------------------------- pairs


def select_pairs(shards, table, count: int, bars: int, context_bars: int, seed: int) -> list[Pair]:
    """Up to `count` pairs, at most one per piece, the pieces in a seeded random order.

    A piece needs `bars` + 1 bars; its cut bar is drawn so that the context is as long as the
    piece allows (up to `context_bars`). Pairs whose context or continuation has no note are
    skipped (nothing to compare). `table` is a `train.windows.TokenTable`.
    """
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    for piece in rng.permutation(len(shards)):
        if len(pairs) >= count:
            break
        piece = int(piece)
        tokens = shards.piece(piece).astype(np.int64)
        starts = shards.bars_of_piece(piece)
        n_bars = len(starts)
        if n_bars < bars + 1:
            continue
        cut = int(rng.integers(min(context_bars, n_bars - bars), n_bars - bars + 1))
        first = max(0, cut - context_bars)
        end = int(starts[cut + bars]) if cut + bars < n_bars else len(tokens)
        context = tokens[starts[first]: starts[cut]]
        continuation = tokens[starts[cut]: end]
        if not (np.any(table.pitch_of[context] >= 0) and np.any(table.pitch_of[continuation] >= 0)):
            continue
        if first > 0:
            tempo_id, timesig_id = (int(v) for v in shards.bar_context[shards.bar_slice(piece)][first])
            context = restate_context(context, table, tempo_id, timesig_id)
        pairs.append(Pair(piece, cut, cut - first, context, continuation, tokens[starts[cut - 1]: starts[cut]]))
    return pairs


def restate_context(tokens: np.ndarray, table, tempo_id: int, timesig_id: int) -> np.ndarray:
    """A passage cut from mid-piece with the time signature after its first Bar and the tempo
    after its first Position, where they are missing (-1: none in force), as a listener who
    starts there is told them. tokens: int64 [n] starting with Bar -> int64 [n or n + 1 or n + 2]."""
    out = list(tokens)
    if timesig_id >= 0 and (len(out) < 2 or not table.is_timesig[out[1]]):
        out.insert(1, timesig_id)
    if tempo_id >= 0:
        pos = next((i for i, t in enumerate(out) if table.is_position[t]), None)
        if pos is not None and (pos + 1 >= len(out) or table.tempo_rank[out[pos + 1]] < 0):
            out.insert(pos + 1, tempo_id)
    return np.array(out, np.int64)


def bar_notes(layout, ids: Sequence[int] | np.ndarray) -> list[BarNote]:
    """Decode a passage that starts at a bar line into notes placed in their bars (bar 0 first)."""
    from model.remi_grammar import DecodedNote, RemiStreamDecoder

    decoder = RemiStreamDecoder(layout=layout)
    notes: list[BarNote] = []
    for token in ids:
        for event in decoder.push(int(token)):
            if isinstance(event, DecodedNote):
                notes.append(BarNote(event.pitch, max(decoder.bar_index, 0),
                                     event.start_beats - decoder.bar_start_beats, event.duration_beats))
    return notes


# --------------------------------------------------------------------------------- systems


def model_continuation(engine, pair: Pair, bars: int, settings, seed: int) -> list[int]:
    """The engine's continuation of BOS + the pair's context (ids from the forced Bar on)."""
    engine.reset()  # zero state, then BOS
    engine.feed(pair.context.tolist())
    return engine.generate(bars, settings, seed=seed).tokens[0]


def _continue_with(engine, bars: int, settings, seed: int, i: int, pair: Pair) -> list[int]:
    return model_continuation(engine, pair, bars, settings, seed + i)


def repeat_last_bar(pair: Pair, bars: int) -> list[int]:
    """The context's last bar, `bars` times."""
    return pair.last_bar.tolist() * bars


def ngram_continuation(ngram, grammar, history: Sequence[int], bars: int, settings, generator) -> list[int]:
    """`bars` bars sampled from the n-gram after `history` (BOS + context), drawn the way
    `Engine.generate` draws: a Bar and the context's last TimeSig forced, then grammar-masked
    sampling with `settings` until bar `bars` + 1 opens or EOS comes."""
    import torch

    from daemon.engine import MAX_TOKENS_PER_BAR
    from model.remi_grammar import TokenKind
    from model.sampling import sample

    layout = grammar.layout
    timesig = next((t for t in reversed(history) if layout.kinds[t] == TokenKind.TIMESIG), None)
    tokens = [layout.bar_id] + ([timesig] if timesig is not None else [])
    state = grammar.walk(tokens)
    context = list(history) + tokens
    window = max(ngram.order - 1, 0)
    bars_open = 1
    for _ in range(MAX_TOKENS_PER_BAR * bars):
        probs = ngram.distribution(context[len(context) - window:] if window else [])
        logits = torch.from_numpy(np.log(probs))[None]  # [1, V]
        token = int(sample(logits, settings, grammar.mask(state)[None], generator)[0])
        if token == layout.bar_id:
            bars_open += 1
            if bars_open > bars:
                break
        if token == layout.eos_id:
            break
        state = grammar.advance(state, token)
        tokens.append(token)
        context.append(token)
    return tokens


def texture(notes: list[BarNote], bars: int) -> dict[str, float]:
    """A passage's own texture figures (see TEXTURE)."""
    return {"notes_per_bar": notes_per_bar(notes, bars), "chord_share": chord_share(notes),
            "polyphony": mean_polyphony(notes), "pitch_range": pitch_range(notes),
            "pc_entropy": pitch_class_entropy(notes)}


def pair_figures(generated: list[BarNote], real: list[BarNote], key: Key | None, bars: int) -> PairFigures:
    """A system's figures on one pair: generated notes against the real continuation's."""
    return PairFigures(
        pitch_class_overlap=histogram_overlap(pitch_class_histogram(generated), pitch_class_histogram(real)),
        onset_overlap=histogram_overlap(onset_histogram(generated), onset_histogram(real)),
        density_ratio=density_ratio(generated, real, bars),
        in_key_share=in_key_share(generated, key) if key is not None else math.nan,
        **texture(generated, bars),
    )


def reference_figures(real: list[BarNote], key: Key | None, bars: int) -> PairFigures:
    """The real continuation's own figures: in-key share against the context's key, texture."""
    return PairFigures(in_key_share=in_key_share(real, key) if key is not None else math.nan,
                       **texture(real, bars))


def summarise(name: str, rows: list[PairFigures], seconds: float) -> GenerationResult:
    figures = {key: Summary.of(getattr(row, key) for row in rows) for key, _, _ in FIGURES}
    return GenerationResult(name, figures, seconds, rows)


def evaluate_generation(pairs: list[Pair], systems: dict[str, Callable[[int, Pair], list[int]]], layout,
                        bars: int) -> list[GenerationResult]:
    """Run every system on every pair and summarise; the last row is the real continuation."""
    reals = [bar_notes(layout, pair.continuation) for pair in pairs]
    keys = [estimate_key(bar_notes(layout, pair.context)) for pair in pairs]
    results = []
    for name, continue_pair in systems.items():
        t0, rows = time.perf_counter(), []
        for i, pair in enumerate(pairs):
            generated = bar_notes(layout, continue_pair(i, pair))
            rows.append(pair_figures(generated, reals[i], keys[i], bars))
        results.append(summarise(name, rows, time.perf_counter() - t0))
        log.info("%s: %d pairs in %.1f s", name, len(pairs), results[-1].seconds)
    results.append(summarise("real continuation (reference)",
                             [reference_figures(real, key, bars) for real, key in zip(reals, keys)], 0.0))
    return results


# --------------------------------------------------------------------------------- command


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from daemon.engine import Engine
    from model import load
    from model.remi_grammar import RemiGrammar
    from model.sampling import SamplingSettings
    from tools.cli import UserError
    from train.shards import TokenShards
    from train.windows import TokenTable

    if args.pairs < 0 or args.bars < 1 or args.context_bars < 1:
        raise UserError("--pairs must be >= 0, --bars and --context-bars >= 1")
    if not args.temperature > 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--temperature must be > 0, --top-p in (0, 1], --top-k >= 0")
    model, meta = load(args.checkpoint)
    shards = checked_split(args.data, args.split, args.checkpoint, meta)
    tokenizer = meta.tokenizer()
    table = TokenTable.from_vocab(tokenizer.vocab)
    bos = table.bos_id
    pieces = pieces_of(shards, args.max_tokens, bos)
    notes = int(sum(np.count_nonzero(table.pitch_of[piece] >= 0) for piece in pieces))

    models = [(f"RWKV-7 {meta.model_id}", model, meta)]
    if args.baseline is not None:
        base_model, base_meta = load(args.baseline)
        if base_meta.vocab_hash != meta.vocab_hash:
            raise UserError(f"--baseline {args.baseline} has another tokenizer than {args.checkpoint}; "
                            "both must read the same prepared data")
        models.append((f"baseline RWKV-7 {base_meta.model_id}", base_model, base_meta))

    results = []
    for name, scored, _ in models:
        t0 = time.perf_counter()
        total, count = model_nll(scored, pieces)
        results.append(NllResult(name, total / count, total / max(1, notes), count, notes,
                                 time.perf_counter() - t0))

    t0 = time.perf_counter()
    train = TokenShards(args.data, "train")
    order = args.ngram_order
    if order == 0:  # the baseline gets its best order, chosen on val (not on the scored split)
        val_pieces = pieces_of(TokenShards(args.data, "val"), 50_000, bos)
        full = fit_ngram(train, model.cfg.vocab_size, 6, bos)
        scores = {}
        for candidate in range(2, 7):
            nll, n = full.with_order(candidate).nll(val_pieces)
            scores[candidate] = nll / n
            log.info("n-gram order %d: val NLL %.4f", candidate, nll / n)
        order = min(scores, key=scores.get)
        ngram = full.with_order(order)
    else:
        ngram = fit_ngram(train, model.cfg.vocab_size, order, bos)
    log.info("n-gram fitted on %d train pieces in %.1f s", len(train), time.perf_counter() - t0)
    t0 = time.perf_counter()
    total, count = ngram.nll(pieces)
    ngram_name = f"{order}-gram (abs. discounting)"
    results.append(NllResult(ngram_name, total / count, total / max(1, notes), count,
                             notes, time.perf_counter() - t0))

    generation: list[GenerationResult] = []
    pairs: list[Pair] = []
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p)
    if args.pairs:
        pairs = select_pairs(shards, table, args.pairs, args.bars, args.context_bars, args.seed)
        if not pairs:
            raise UserError(f"no piece of the {args.split} split has the {args.bars + 1} bars with notes "
                            "that a pair needs; lower --bars")
        if len(pairs) < args.pairs:
            log.warning("only %d of the %d pieces can give a pair; using %d pairs",
                        len(pairs), len(shards), len(pairs))
        grammar = RemiGrammar(tokenizer)
        systems: dict[str, Callable[[int, Pair], list[int]]] = {}
        for name, generating, generating_meta in models:
            engine = Engine(generating, generating_meta)
            systems[name] = functools.partial(_continue_with, engine, args.bars, settings, args.seed)
        systems.update({
            "repeat the last bar": lambda i, pair: repeat_last_bar(pair, args.bars),
            f"{order}-gram": lambda i, pair: ngram_continuation(
                ngram, grammar, [bos, *pair.context.tolist()], args.bars, settings,
                torch.Generator().manual_seed(args.seed + i)),
        })
        generation = evaluate_generation(pairs, systems, grammar.layout, args.bars)

    if args.json:
        report = {"checkpoint": str(args.checkpoint), "split": args.split,
                  "results": [asdict(r) for r in results]}
        if args.pairs:
            report["generation"] = {
                "pairs": len(pairs), "bars": args.bars, "context_bars": args.context_bars, "seed": args.seed,
                "sampling": asdict(settings),
                "systems": [{"name": g.name, "seconds": g.seconds,
                             "figures": {k: json_summary(s) for k, s in g.figures.items()}} for g in generation],
            }
        print(json.dumps(report, indent=1, allow_nan=False))
    else:
        print(f"{args.split} split of {args.data}: {len(pieces)} pieces, {count:,} tokens, {notes:,} notes")
        print(f"{'model':<32} {'NLL/token':>10} {'NLL/note':>10}")
        for r in results:
            print(f"{r.name:<32} {r.nll_per_token:>10.4f} {r.nll_per_note:>10.3f}")
        if args.pairs:
            print()
            print(generation_table(generation, len(pairs), args, settings))
    return 0


def json_summary(summary: Summary) -> dict[str, float | int | None]:
    """A Summary as JSON values: null where a figure is undefined (JSON has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(summary).items()}


def generation_table(generation: list[GenerationResult], n_pairs: int, args: argparse.Namespace, settings) -> str:
    """The generation figures as two text tables (agreement, texture): per cell the median,
    then the mean ± 95% CI half-width."""
    lines = [f"generation on {n_pairs} pairs of the {args.split} split: up to {args.context_bars} bars of context, "
             f"{args.bars} bars continued (temperature {settings.temperature:g}, top-p {settings.top_p:g}, "
             f"top-k {settings.top_k}); per cell: median (mean ± 95% CI) over pairs"]
    width = 36
    for title, figures in (("agreement with the real continuation", AGREEMENT), ("texture", TEXTURE)):
        lines += ["", title]
        lines.append(f"{'system':<{width}}" + "".join(f" {heading:>22}" for _, heading, _ in figures))
        for g in generation:
            cells = []
            for key, _, digits in figures:
                s = g.figures[key]
                cells.append("-" if s.n == 0 else f"{s.median:.{digits}f} ({s.mean:.{digits}f}±{s.ci95:.{digits}f})")
            lines.append(f"{g.name:<{width}}" + "".join(f" {cell:>22}" for cell in cells))
    return "\n".join(lines)
