"""Reference servers the benchmark measures appchat against (never shipped in the package)."""
