"""``fedvox-sim pretrain``: the public synthetic corpus, and the non-private base trained on it."""
