"""Metal kernel sources, shipped as package data."""
