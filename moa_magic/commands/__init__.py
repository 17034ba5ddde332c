"""`moa` subcommands, one module each with `main(argv) -> exit status`; `moa "prompt"` is cli.py.

A prompt that is exactly a subcommand's name still runs as a prompt with `moa -- cache`.
"""

SUBCOMMANDS = ("cache", "replay", "chat", "serve", "batch", "daemon")
