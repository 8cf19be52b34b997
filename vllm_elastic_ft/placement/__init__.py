"""Expert placement: which rank holds which experts, after a fault or a join."""
