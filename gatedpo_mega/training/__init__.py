"""Training: the step, the reference pass, the loop and its outputs."""
