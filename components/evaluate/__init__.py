"""Stage 4: zero-shot classification and retrieval, with a report."""
