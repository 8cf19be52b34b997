"""Everything that wires the plugin into vLLM 0.32: patches, config access."""
