"""Training with HuggingFace Accelerate: the engine (fit), checkpoints, optimizers, losses, launch and the tracker
protocol that keeps MLflow out of the loop."""
