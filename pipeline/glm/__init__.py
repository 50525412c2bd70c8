"""The GLM model layer: checkpoints, tokenizers, the torch network, the request layout and the
multi-mask procedures, and the demo checkpoint. It knows nothing of engines or jobs."""
