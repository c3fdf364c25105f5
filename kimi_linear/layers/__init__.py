"""nn.Modules of the model. Imports only from ops (and distributed, later)."""
