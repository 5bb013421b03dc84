"""Evaluation of teachers and students on frozen features."""
