"""Countdown arithmetic task: reward function, prompt builder, data loader and generator."""
