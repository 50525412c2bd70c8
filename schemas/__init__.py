"""Versioned schemas of what glm-infill writes (see schemas/README.md)."""
