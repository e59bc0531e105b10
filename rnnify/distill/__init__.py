"""Training a converted model: data, losses, stages and the accelerate training loop."""
