"""Command lines: each module parses flags (absl) and calls the layer below; nothing else lives here."""
