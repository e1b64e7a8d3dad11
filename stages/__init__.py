"""The user-facing layer: the command line (`cli.py`), the yaml config loader (`config_loader.py`) and
one short runner per pipeline stage. The library (`linearize/`) never parses argv or reads yaml."""
