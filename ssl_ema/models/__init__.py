"""Backbones (timm) and heads (lightly)."""
