"""Developer tools: a cluster of real nodes on one machine."""
