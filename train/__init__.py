"""Corpus building, MIDI -> token shards, the bar-window dataset and the training loop."""
