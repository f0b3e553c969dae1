"""Diff3R: feed-forward 3D Gaussian Splatting trained through a difftto test-time-optimization layer."""
