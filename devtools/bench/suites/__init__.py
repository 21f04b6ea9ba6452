"""One module per benchmark suite: what it sends, what it measures, and its targets."""
