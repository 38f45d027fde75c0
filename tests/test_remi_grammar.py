"""RemiGrammar accepts every real REMI stream, and sampling under its masks always decodes;
RemiStreamDecoder gives the notes, tempos and pedals of `tokenizer.decode`."""

from __future__ import annotations

import random

import pytest
import symusic
import torch
from symusic import Note, Pedal, Score, Tempo, TimeSignature, Track

from model.remi_grammar import (
    DecodedNote,
    DecodedPedal,
    DecodedTempo,
    GrammarError,
    Phase,
    RemiGrammar,
    RemiStreamDecoder,
    UnsupportedTokenizerError,
    check_piano_remi,
)
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer
from train.prepare import encode_score


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def grammar(tokenizer):
    return RemiGrammar(tokenizer)


@pytest.fixture(scope="module")
def corpus_sequences(tokenizer, corpus_midi_files) -> list[list[int]]:
    """The real pieces as the data pipeline tokenizes them."""
    return [encode_score(tokenizer, symusic.Score(str(p))).tolist() for p in corpus_midi_files]


def random_score(rng: random.Random, tokenizer) -> Score:
    """A piece with what the corpus lacks: pedals, tempo and meter changes, chords, long notes."""
    tpq = rng.choice([480, 960, 384])
    score = Score(tpq)
    length = rng.randint(8, 40) * tpq
    meters = list(tokenizer.time_signatures)
    score.time_signatures.append(TimeSignature(0, *rng.choice(meters)))
    # Meter changes at least 8 quarters apart, so each lands in its own bar: when miditok
    # replaces a change by another of a different family in the same bar, its grid is finer
    # than the positions and it can repeat a Position (a stream this grammar refuses).
    t = 0
    while (t := t + rng.randrange(8 * tpq, 40 * tpq)) < length:
        score.time_signatures.append(TimeSignature(t, *rng.choice(meters)))
    for _ in range(rng.randint(1, 5)):
        score.tempos.append(Tempo(rng.randrange(length), rng.uniform(30, 300)))
    score.tempos.sort(key=lambda t: t.time)
    track = Track("piano", 0, False)
    for _ in range(rng.randint(1, 80)):
        start = rng.randrange(length)
        for _ in range(rng.choice([1, 1, 2, 3])):
            dur = rng.randrange(1, rng.choice([tpq, 4 * tpq, 16 * tpq]))
            track.notes.append(Note(start, dur, rng.randint(21, 108), rng.randint(1, 127)))
    t = 0
    while (t := t + rng.randrange(1, 3 * tpq)) < length:
        dur = rng.randrange(1, 3 * tpq)
        track.pedals.append(Pedal(t, dur))
        t += dur
    track.notes.sort(key=lambda n: (n.time, n.duration, n.pitch))
    score.tracks.append(track)
    return score


@pytest.fixture(scope="module")
def random_sequences(tokenizer) -> list[list[int]]:
    rng = random.Random(11)
    return [list(tokenizer.encode(random_score(rng, tokenizer))[0].ids) for _ in range(60)]


def walk_checking_masks(grammar: RemiGrammar, ids: list[int]) -> list:
    """Advance over `ids`, asserting that each id is allowed by the mask before it."""
    state = grammar.start_state()
    states = [state]
    for i, token_id in enumerate(ids):
        mask = grammar.mask(state)
        assert mask.any()
        assert bool(mask[token_id]), f"token {i} ({grammar.layout.strings[token_id]}) masked after {state}"
        state = grammar.advance(state, token_id)
        states.append(state)
    return states


def test_grammar_accepts_every_real_sequence(grammar, corpus_sequences) -> None:
    assert len(corpus_sequences) >= 100
    for ids in corpus_sequences:
        walk_checking_masks(grammar, ids)


def test_grammar_accepts_pedal_tempo_and_meter_changes(grammar, tokenizer, random_sequences) -> None:
    kinds = set()
    for ids in random_sequences:
        walk_checking_masks(grammar, ids)
        kinds.update(tokenizer[i].split("_")[0] for i in ids)
        # With BOS in front, then EOS and PAD after it, the stream is still valid.
        state = grammar.walk([grammar.layout.bos_id, *ids, grammar.layout.eos_id, grammar.layout.pad_id])
        assert state.phase == Phase.ENDED
    assert {"Pedal", "PedalOff", "Tempo", "TimeSig", "Position", "Duration"} <= kinds


def test_grammar_mask_agrees_with_transitions(grammar, random_sequences, corpus_sequences) -> None:
    seen: dict[tuple, object] = {}
    for ids in random_sequences[:20] + corpus_sequences[:10]:
        for state in walk_checking_masks(grammar, ids):
            seen.setdefault(grammar._mask_key(state), state)
    assert len(seen) > 100
    V = grammar.layout.vocab_size
    for state in seen.values():
        expected = torch.tensor([grammar.next_state(state, i) is not None for i in range(V)])
        assert torch.equal(grammar.mask(state), expected), state


def test_grammar_rejects_what_miditok_never_emits(grammar, tokenizer) -> None:
    t = tokenizer.vocab
    head = [t["Bar_None"], t["TimeSig_4/4"], t["Position_4"],
            t["Pitch_60"], t["Velocity_63"], t["Duration_1.0.8"]]
    assert grammar.accepts(head)
    bad = [
        [t["Position_0"]],  # no Bar first
        [t["Bar_None"], t["Position_0"]],  # no TimeSig after the Bar
        [t["Bar_None"], t["TimeSig_4/4"], t["Pitch_60"]],  # a note without a Position
        head + [t["Position_4"]],  # positions must rise within a bar
        head + [t["Position_32"]],  # 4/4 has positions 0..31
        head + [t["Pitch_60"]],  # the same pitch twice at one position
        head + [t["Pitch_59"]],  # pitches rise within a position
        head + [t["Velocity_63"]],  # a Velocity without a Pitch
        [*head[:3], t["Pitch_60"], t["Duration_1.0.8"]],  # a Pitch without a Velocity
        [*head[:3], t["Pedal_0"], t["Pitch_60"], t["Velocity_63"], t["Duration_1.0.8"], t["Position_8"],
         t["Pedal_0"]],  # the pedal is already down
        [*head[:3], t["PedalOff_0"]],  # the pedal is already up
        [*head[:3], t["Pitch_60"], t["Velocity_63"], t["Duration_1.0.8"], t["Tempo_121.29"]],
        head + [t["PAD_None"]],  # no padding mid-stream
        head + [t["BOS_None"]],
        head + [t["EOS_None"], t["Bar_None"]],  # nothing after EOS but padding
        [*head[:3], t["Position_8"]],  # a Position carries at least one event
    ]
    for ids in bad:
        assert not grammar.accepts(ids), [tokenizer[i] for i in ids]
    with pytest.raises(GrammarError) as info:
        grammar.walk(bad[0])
    assert info.value.token == "Position_0"


def test_grammar_lenient_walk_takes_miditok_repeated_position(grammar, tokenizer) -> None:
    # 9/8 replaced by 6/4 in the same bar: miditok keeps the 16-ticks-per-quarter grid of the
    # eighth-note meter but its 4/4-family Positions are two ticks wide.
    score = Score(480)
    for time, num, den in [(0, 3, 4), (1797, 9, 8), (2097, 6, 4)]:
        score.time_signatures.append(TimeSignature(time, num, den))
    track = Track("piano", 0, False)
    track.notes.append(Note(3600, 240, 60, 80))  # fine-grid tick 120
    track.pedals.append(Pedal(2000, 1620))  # released at fine-grid tick 121: the same Position
    score.tracks.append(track)
    ids = list(tokenizer.encode(score)[0].ids)
    names = [tokenizer[i] for i in ids]
    assert names[-6:] == ["Position_12", "Pitch_60", "Velocity_79", "Duration_0.4.8",
                          "Position_12", "PedalOff_0"]
    assert not grammar.accepts(ids)
    state = grammar.walk(ids, lenient=True)
    more = sample_stream(grammar, torch.Generator().manual_seed(1), steps=100, prefix=[], eos_bias=-20.0,
                         state=state)
    assert_decoders_agree(tokenizer, ids + more)


def test_grammar_states_are_values_and_masks_are_cached(grammar, tokenizer) -> None:
    t = tokenizer.vocab
    base = grammar.walk([t["Bar_None"], t["TimeSig_3/4"], t["Position_2"]])
    with_note = grammar.walk([t["Pitch_60"], t["Velocity_63"], t["Duration_1.0.8"]], base)
    with_tempo = grammar.advance(base, t["Tempo_121.29"])
    assert base.phase == Phase.AFTER_POSITION  # advancing copies, never changes a state
    assert with_note.phase == Phase.AFTER_DURATION and with_tempo.phase == Phase.AFTER_TEMPO
    batch = grammar.masks([base, with_note, with_tempo, with_note])
    assert batch.shape == (4, len(tokenizer.vocab)) and batch.dtype == torch.bool
    assert grammar.mask(with_note) is grammar.mask(grammar.walk([t["Pitch_60"], t["Velocity_63"],
                                                                  t["Duration_0.4.8"]], base))
    after_note = {tokenizer[i] for i in batch[1].nonzero().flatten().tolist()}
    assert "Pitch_60" not in after_note and "Pitch_61" in after_note and "Position_23" in after_note
    assert "Position_2" not in after_note and "Position_24" not in after_note and "Bar_None" in after_note


def sample_stream(grammar: RemiGrammar, gen: torch.Generator, steps: int, prefix: list[int],
                  eos_bias: float, state=None) -> list[int]:
    """Sample `steps` ids after `prefix` (or from `state`) from random logits under the masks."""
    state = grammar.walk(prefix) if state is None else state
    ids = list(prefix)
    V = grammar.layout.vocab_size
    for _ in range(steps):
        mask = grammar.mask(state)
        assert mask.any(), state
        logits = torch.randn(V, generator=gen) * 3.0
        logits[grammar.layout.eos_id] += eos_bias
        logits = logits.masked_fill(~mask, float("-inf"))
        token_id = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        state = grammar.advance(state, token_id)
        ids.append(token_id)
    return ids


def miditok_events(tokenizer, ids: list[int]):
    """Notes, tempos and pedals of `tokenizer.decode`, in beats."""
    score = tokenizer.decode([ids])
    tpq = score.ticks_per_quarter
    track = score.tracks[0] if len(score.tracks) else None
    notes = [(n.pitch, n.velocity, n.time / tpq, n.duration / tpq) for n in (track.notes if track else [])]
    tempos = [(t.time / tpq, t.mspq) for t in score.tempos]
    pedals = [(p.time / tpq, p.duration / tpq) for p in (track.pedals if track else [])]
    return notes, tempos, pedals, track is not None


def stream_events(decoder: RemiStreamDecoder, ids: list[int]):
    notes, tempos, pedals, down_at = [], [], [], None
    for ev in decoder.push_many(ids):
        if isinstance(ev, DecodedNote):
            notes.append((ev.pitch, ev.velocity, ev.start_beats, ev.duration_beats))
        elif isinstance(ev, DecodedTempo):
            tempos.append((ev.beats, Tempo(0, ev.qpm).mspq))
        elif isinstance(ev, DecodedPedal):
            if ev.down:
                down_at = ev.beats
            else:
                pedals.append((down_at, ev.beats - down_at))
    return notes, tempos, pedals


def assert_decoders_agree(tokenizer, ids: list[int]) -> int:
    notes, tempos, pedals, has_track = miditok_events(tokenizer, ids)
    got_notes, got_tempos, got_pedals = stream_events(RemiStreamDecoder(tokenizer), ids)
    if not got_tempos or got_tempos[0][0] != 0:  # miditok then adds its default tempo at 0
        got_tempos.insert(0, (0.0, Tempo(0, tokenizer.default_tempo).mspq))
    assert got_notes == notes
    assert got_tempos == tempos
    if has_track:  # miditok drops a track without notes, and its pedals with it
        assert got_pedals == pedals
    return len(notes)


def test_sampling_under_masks_always_decodes(grammar, tokenizer) -> None:
    gen = torch.Generator().manual_seed(5)
    total_notes = 0
    for i in range(40):
        ids = sample_stream(grammar, gen, steps=500, prefix=[], eos_bias=-20.0 if i % 4 else 0.0)
        total_notes += assert_decoders_agree(tokenizer, ids)
    assert total_notes > 1000


def test_sampling_continues_real_pieces_mid_bar(grammar, tokenizer, corpus_sequences) -> None:
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(6)
    for ids in rng.sample(corpus_sequences, 20):
        cut = rng.randrange(1, len(ids))
        whole = sample_stream(grammar, gen, steps=200, prefix=ids[:cut], eos_bias=-20.0)
        assert_decoders_agree(tokenizer, whole)


def test_stream_decoder_matches_miditok(tokenizer, corpus_sequences, random_sequences) -> None:
    for ids in corpus_sequences + random_sequences:
        assert assert_decoders_agree(tokenizer, ids) > 0


def test_stream_decoder_tracks_bars_and_meters(tokenizer) -> None:
    t = tokenizer.vocab
    dec = RemiStreamDecoder(tokenizer)
    out = dec.push_many([t["Bar_None"], t["TimeSig_3/4"], t["Position_12"], t["Tempo_87.42"],
                         t["Pedal_0"], t["Pitch_60"], t["Velocity_63"]])
    assert out == [DecodedTempo(1.5, 87.42), DecodedPedal(1.5, True)]
    assert dec.push(t["Duration_1.4.8"]) == [DecodedNote(60, 63, 1.5, 1.5)]
    dec.push_many([t["Bar_None"], t["TimeSig_6/8"], t["Position_4"]])
    assert (dec.bar_index, dec.bar_start_beats, dec.meter, dec.time_beats) == (1, 3.0, (6, 8), 3.25)
    twin = dec.copy()
    twin.push_many([t["Bar_None"], t["TimeSig_6/8"]])
    assert twin.bar_start_beats == 6.0 and dec.bar_start_beats == 3.0  # copies are independent
    # A note whose Velocity/Duration run is broken is dropped, as miditok drops it.
    assert dec.push_many([t["Pitch_62"], t["Position_6"], t["Pitch_64"], t["Velocity_63"],
                          t["Duration_1.0.8"]]) == [DecodedNote(64, 63, 3.375, 0.5)]


def test_check_piano_remi_refuses_other_layouts() -> None:
    check_piano_remi(build_tokenizer())
    for change in ({"use_programs": True}, {"use_sustain_pedals": False}, {"use_rests": True}):
        with pytest.raises(UnsupportedTokenizerError):
            RemiGrammar(build_tokenizer({**DEFAULT_TOKENIZER_PARAMS, **change}))
