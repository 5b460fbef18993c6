"""Shared numerics: pure functions (no nn.Module) used by qat, float8 and optim."""
