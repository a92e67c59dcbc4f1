"""Data: document-level datasets, preprocessing, synthetic lengths."""
