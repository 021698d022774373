"""fedvox coordinating side: ServerApp, strategy, central DP, checkpoints, launcher."""
