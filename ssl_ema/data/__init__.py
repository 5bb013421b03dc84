"""Data sets (digits, CIFAR, ImageFolder) and the augmented views methods train on.

`datasets.build_data` builds what a recipe names; `batch` states the layout methods receive. The
package imports nothing itself, so a method may import its views from here without a cycle.
"""
