"""The HTTP surface (paths are contract: see DESIGN.md)."""
