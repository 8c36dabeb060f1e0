"""The dataset side: scan an ImageFolder tree, decode it once, group duplicates, split without
leakage, describe it, and the prepared format every later stage reads."""
