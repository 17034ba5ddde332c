"""The warm process (`moa daemon start`): a fork server that makes `moa` start in milliseconds.

Why it exists: a fresh `moa` process spends ~300 ms before its first request, most of it importing
aiohttp (which builds two TLS contexts at import), the engine and the renderers, and building token
encodings. No cold process can send its first request in the 150 ms goal of the latency issue. A
fork server ("zygote", as in Android, or Rails' Spring) pays for all of that once: `server.py`
imports everything a run needs, then waits on a Unix socket; each command goes to a child forked
ahead of time (`child.py`), which takes over the command's stdin, stdout, stderr, environment,
working directory, umask and argv and runs the same code path as the cold CLI (`cli.run_here`).
`client.py` is the `moa` side: nothing a bare `python` has not loaded but `_socket`, so a `moa`
with no daemon pays a fingerprint and one stat (see `cli.entry`).

Opt-in: nothing changes until `moa daemon start`; `MOA_MAGIC_DAEMON=off` runs every command in-process.
"""
