"""The engine in its own process answers exactly like the engine in this one, and survives its
child being killed."""

import os
import signal
import time

import pytest
import torch

from daemon.engine import Engine
from daemon.engine_process import EngineProcess, EngineProcessError, RemoteEngineError
from model.checkpoint import CheckpointMeta, load, save
from model.sampling import SamplingSettings
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
from tests.model_factory import random_model

SETTINGS = SamplingSettings(temperature=1.0, top_k=0, top_p=0.95)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "model.safetensors"
    tokenizer = build_tokenizer()
    meta = CheckpointMeta(random_model(n_layer=2, n_embd=64).cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer))
    save(random_model(n_layer=2, n_embd=64), path, meta)
    return path


@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory):
    """A random model that never draws EOS, so a long generation really runs long."""
    path = tmp_path_factory.mktemp("engine") / "endless.safetensors"
    tokenizer = build_tokenizer()
    model = random_model(n_layer=2, n_embd=64, seed=1)
    with torch.no_grad():
        # The head sees ln_out(x) = w * normalised(x) + b; with b = 1 everywhere and the EOS row
        # pointing against b, EOS's logit is about -100 * sqrt(C), far below every other one.
        model.ln_out.bias.fill_(1.0)
        model.head.weight[tokenizer.vocab["EOS_None"]] = -100.0 / model.cfg.n_embd**0.5
    save(model, path, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer)))
    return path


def phrase(tokenizer) -> list[int]:
    """Two bars of C major arpeggios at 120 BPM, as miditok encodes them (REMI ids, no BOS)."""
    from symusic import Note, Score, Tempo, TimeSignature, Track

    score = Score(480)
    score.tempos.append(Tempo(0, 120.0))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    track = Track(program=0)
    for i, pitch in enumerate((60, 64, 67, 72, 67, 64, 60, 55)):
        track.notes.append(Note(i * 480, 400, pitch, 80))
    score.tracks.append(track)
    ids = tokenizer.encode(score)
    ids = ids[0].ids if isinstance(ids, list) else ids.ids
    return [i for i in ids if i != tokenizer.vocab["BOS_None"] and i != tokenizer.vocab["EOS_None"]]


def local_engine(checkpoint) -> Engine:
    model, meta = load(checkpoint)
    return Engine(model, meta)


def test_the_process_generates_what_the_local_engine_generates(checkpoint):
    local = local_engine(checkpoint)
    ids = phrase(local.tokenizer)
    local.feed(ids)
    with torch.no_grad():
        expected = local.generate(2, SETTINGS, seed=7, variations=3)
    streamed = []
    with EngineProcess(checkpoint, niceness=0) as remote:
        assert remote.model_id == local.model_id and remote.vocab_size == len(local.tokenizer)
        remote.feed(ids)
        got = remote.generate(2, SETTINGS, seed=7, variations=3, on_event=lambda i, e: streamed.append((i, e)))
        assert list(remote.history) == ids
    assert got.tokens == expected.tokens
    assert got.events == expected.events
    # Every event reached the caller as it was drawn, in order per variation.
    for i in range(3):
        assert [e for v, e in streamed if v == i] == expected.events[i]


def test_reset_and_a_stop_request_reach_the_child(endless_checkpoint):
    local = local_engine(endless_checkpoint)
    with EngineProcess(endless_checkpoint, niceness=0) as remote:
        remote.feed(phrase(remote.tokenizer))
        remote.reset()
        assert list(remote.history) == []
        with torch.no_grad():
            expected = local.generate(1, SETTINGS, seed=3)
        assert remote.generate(1, SETTINGS, seed=3).tokens == expected.tokens

        calls = []

        def stop_after_first_event() -> bool:
            calls.append(1)
            return len(events) > 0

        events = []
        stopped = remote.generate(64, SETTINGS, seed=3, on_event=lambda i, e: events.append(e),
                                  should_stop=stop_after_first_event)
        assert stopped.stopped and calls
        assert stopped.tokens[0].count(remote.tokenizer.vocab["Bar_None"]) < 64
        # The next generation is not stopped by the old request.
        assert not remote.generate(1, SETTINGS, seed=3).stopped


def test_a_killed_child_is_replaced_and_re_primed_from_the_history(checkpoint):
    local = local_engine(checkpoint)
    ids = phrase(local.tokenizer)
    local.feed(ids)
    with torch.no_grad():
        expected = local.generate(1, SamplingSettings(temperature=0.05, top_k=1, top_p=1.0), seed=1)
    with EngineProcess(checkpoint, niceness=0) as remote:
        remote.feed(ids)
        first = remote.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while remote._process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        got = remote.generate(1, SamplingSettings(temperature=0.05, top_k=1, top_p=1.0), seed=1)
        assert remote.pid != first and remote.restarts == 1
    assert got.tokens == expected.tokens


def test_a_child_killed_during_a_call_raises_and_the_next_call_works(endless_checkpoint):
    with EngineProcess(endless_checkpoint, niceness=0) as remote:
        def kill_on_first_event(i, event):
            if remote.restarts == 0:
                os.kill(remote.pid, signal.SIGKILL)

        with pytest.raises(EngineProcessError, match="died during generate"):
            remote.generate(64, SETTINGS, seed=1, on_event=kill_on_first_event)
        assert remote.generate(1, SETTINGS, seed=1).bars == 1
        assert remote.restarts == 1


def test_errors_in_the_child_come_back_and_the_old_model_stays(checkpoint, tmp_path):
    other = tmp_path / "other.safetensors"
    model = random_model(n_layer=2, n_embd=64, seed=5)
    save(model, other, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(build_tokenizer())))
    with EngineProcess(checkpoint, niceness=0) as remote:
        playing = remote.model_id
        with pytest.raises(RemoteEngineError, match="not the checked"):
            remote.swap_checkpoint(other, model_id="0" * 12)
        assert remote.model_id == playing
        meta = remote.swap_checkpoint(other, model_id=load(other)[1].model_id)
        assert remote.model_id == meta.model_id != playing


def test_a_checkpoint_the_child_cannot_load_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EngineProcessError, match="could not load"):
        EngineProcess(bad, niceness=0)
