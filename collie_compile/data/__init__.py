"""Training data: records read from files, tokenized (and cached), packed into rows."""
