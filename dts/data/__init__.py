"""Package data: the embedded default dts.toml and classifyRules.json."""
