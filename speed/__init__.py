"""The speed benchmark: throughput, latency, memory, MFU and cost (never model quality)."""
