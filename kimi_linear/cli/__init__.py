"""Command-line interface: `kimi-linear {init, serve, generate, chat, bench, train}`."""
