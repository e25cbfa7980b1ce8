"""Command-line tools: `tome-plus bench` (and later eval, fidelity, vis)."""
