"""Defaults of the server's reliability flags, in one place for `serve_cmd.py` and `launch.py` (this module
imports nothing, so the CLI's parser stays cheap to build)."""

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024  # --max-request-body-bytes: larger bodies get 413
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # --shutdown-timeout: how long SIGTERM / SIGINT wait for requests in flight
