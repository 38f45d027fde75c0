"""The REMI vocabulary: one miditok tokenizer configuration shared by trainer and daemon.

The tokenizer's parameters travel inside every checkpoint (see `model.checkpoint`), so the
daemon rebuilds exactly the vocabulary a model was trained with. `DEFAULT_TOKENIZER_PARAMS`
is what `rwkv-music prepare` uses unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from miditok import REMI, TokenizerConfig

# Piano-oriented REMI (DESIGN, "Music representation"): the 88 keys, 8 positions per beat,
# 16 velocity bins, tempo and time-signature tokens, the sustain pedal, no drums, no programs.
DEFAULT_TOKENIZER_PARAMS: dict[str, Any] = {
    "pitch_range": [21, 108],  # inclusive: the 88 keys, A0 (21) .. C8 (108)
    "beat_res": {"0_4": 8, "4_12": 4},  # 1/8-beat grid for durations up to 4 beats, 1/4 beyond
    "num_velocities": 16,
    "special_tokens": ["PAD", "BOS", "EOS"],
    "use_velocities": True,
    "use_tempos": True,
    "num_tempos": 32,
    "tempo_range": [40, 250],
    "log_tempos": False,
    "use_time_signatures": True,
    # Common meters only: numerator lists per denominator.
    # 4/2 matters: most of the Renaissance polyphony in music21's corpus is notated in it.
    "time_signature_range": {"4": [1, 2, 3, 4, 5, 6, 7], "8": [3, 5, 6, 7, 9, 12], "2": [2, 3, 4]},
    "use_sustain_pedals": True,
    "sustain_pedal_duration": False,
    "use_chords": False,
    "use_rests": False,
    "use_programs": False,
    "use_pitch_bends": False,
    "use_pitchdrum_tokens": False,  # no drums: keep drum-pitch tokens out of the vocabulary
    "remove_duplicated_notes": True,
    "delete_equal_successive_tempo_changes": True,
    "delete_equal_successive_time_sig_changes": True,
}


def _to_miditok_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly params (string keys, lists) -> the types TokenizerConfig expects."""
    kwargs = dict(params)
    kwargs["pitch_range"] = tuple(params["pitch_range"])
    kwargs["tempo_range"] = tuple(params["tempo_range"])
    kwargs["beat_res"] = {
        tuple(int(b) for b in span.split("_")): int(res) for span, res in params["beat_res"].items()
    }
    kwargs["time_signature_range"] = {
        int(den): list(nums) for den, nums in params["time_signature_range"].items()
    }
    return kwargs


def build_tokenizer(params: dict[str, Any] | None = None) -> REMI:
    """A miditok REMI tokenizer from JSON-friendly parameters (default: the piano REMI)."""
    config = TokenizerConfig(**_to_miditok_kwargs(params or DEFAULT_TOKENIZER_PARAMS))
    return REMI(config)


def vocab_hash(tokenizer: REMI) -> str:
    """A short stable hash of the vocabulary (token string -> id), to refuse a mismatched model."""
    items = sorted(tokenizer.vocab.items(), key=lambda kv: kv[1])
    blob = json.dumps(items, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
