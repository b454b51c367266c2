"""`low_rank` (placeholder while it is written)."""
