"""Bytes on disk, knowing no model: sources, confined file reading, tensor files, atomic publish."""
