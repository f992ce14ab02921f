"""Test-side helpers that start and stop real parts (S3 server, toy models, control plane)."""
