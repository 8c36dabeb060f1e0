"""One-off studies behind design choices; each writes a report under reports/."""
