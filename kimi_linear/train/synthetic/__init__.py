"""`kimi-linear synthetic`: the Kimi Linear report's synthetic tasks (Palindrome, MQAR, Stack) on 2-layer models
of each token mixer (KDA, GDN, full-attention MLA). tasks.py (the generators), models.py (the models),
train_one.py (one run), worker.py (one run as a process), run.py (the suite), reference.py (the report's numbers),
report.py (the table), plot.py (the figures), cli.py (the flags and the command)."""
