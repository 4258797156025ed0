"""Recipes shipped inside the package (the embedded demo)."""
