"""The `rwkv-music` command line and the tools around the model (bench, export/import, ...)."""
